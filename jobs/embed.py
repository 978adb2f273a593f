"""``python jobs/embed.py ...``: ``python -m censusvi.jobs.embed`` from a checkout (see that module).

For ``ray job submit --working-dir . -- python jobs/embed.py ...``: censusvi must be importable,
installed or with ``PYTHONPATH=platform`` in the job's runtime env.
"""

from censusvi.jobs.embed import main

if __name__ == "__main__":
    raise SystemExit(main())
