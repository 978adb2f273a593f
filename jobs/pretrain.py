"""``python jobs/pretrain.py ...``: ``python -m censusvi.jobs.pretrain`` from a checkout (see that module).

For ``ray job submit --working-dir . -- python jobs/pretrain.py ...``: censusvi must be importable,
installed or with ``PYTHONPATH=platform`` in the job's runtime env.
"""

from censusvi.jobs.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
