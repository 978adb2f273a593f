"""The Serve app: plain parts (no Ray) and, in ``app``, the Ray deployments over them.

``settings`` (what a Serve config's ``args`` set), ``versions`` (local copies, a version cache,
following an alias), ``mapper`` / ``annotator`` (what a replica holds and computes), ``grouping``
(requests joined into one pass and split back), ``results`` (the explorer's bounded store),
``metrics`` (the Prometheus counters), ``parsing`` / ``body`` / ``auth`` (a request's options,
bounded body and token). ``app:build_app`` is the import path of ``serve_config.yaml``.
"""
