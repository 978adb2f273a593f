"""``python jobs/promote.py ...``: ``python -m censusvi.jobs.promote`` from a checkout (see that module).

For ``ray job submit --working-dir . -- python jobs/promote.py ...``: censusvi must be importable,
installed or with ``PYTHONPATH=platform`` in the job's runtime env.
"""

from censusvi.jobs.promote import main

if __name__ == "__main__":
    raise SystemExit(main())
