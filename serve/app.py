"""A checkout's entry to the Serve app, which lives in the package: ``censusvi.serving.app``.

``serve run serve/config.yaml`` imports ``censusvi.serving.app:build_app`` itself; this module
keeps ``serve.app:build_app`` (older configs, scripts) pointing at the same app.
"""

from censusvi.serving.app import (  # noqa: F401
    Annotator,
    Ingress,
    Mapper,
    Results,
    Settings,
    Versions,
    app,
    build_app,
)
