"""Ray jobs as modules: ``python -m censusvi.jobs.pretrain|embed|evaluate|promote ...``.

Each parses its arguments, builds a config and calls the library, as ``censusvi`` commands do;
``ray job submit -- python -m censusvi.jobs.pretrain --config census --set out=...`` runs one on a
cluster whose image has censusvi installed. A checkout's ``jobs/*.py`` are shims that call these.
"""
