"""``python jobs/evaluate.py ...``: ``python -m censusvi.jobs.evaluate`` from a checkout (see that module).

For ``ray job submit --working-dir . -- python jobs/evaluate.py ...``: censusvi must be importable,
installed or with ``PYTHONPATH=platform`` in the job's runtime env.
"""

from censusvi.jobs.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
