"""Bearer-token authentication for the Serve app.

The token comes from ``--token-file`` (or ``token_file`` in a Serve config), the ``CENSUSVI_TOKEN``
environment variable, or ``--token`` (visible in ``ps``: prefer the other two). Only its SHA-256
travels to the replicas, so the secret is in no deployment's arguments, and requests are compared
in constant time. Every route checks it but ``/healthz``: liveness and readiness probes
(Kubernetes, load balancers) carry no token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

TOKEN_ENV = "CENSUSVI_TOKEN"


class TokenError(ValueError):
    """The token file cannot be read or is empty; the message says which and how to fix it."""


def token_digest(token: str | None = None, token_file: str | None = None) -> str | None:
    """SHA-256 (hex) of the configured token, or None for no authentication."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise TokenError(f"cannot read the token file {path}: {e.strerror}") from None
        if not token:
            raise TokenError(f"the token file {path} is empty: write the token in it")
    token = token or os.environ.get(TOKEN_ENV) or None
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def presented_digest(authorization: str | None) -> str | None:
    """SHA-256 of the bearer token an ``Authorization`` header presents (None: none presented)."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return hashlib.sha256(value.strip().encode()).hexdigest()


def authorised(authorization: str | None, digest: str | None) -> bool:
    """Whether a request may pass: always with no token configured, else on the same token."""
    if digest is None:
        return True
    presented = presented_digest(authorization)
    return presented is not None and hmac.compare_digest(presented, digest)
