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

from censusvi.untrusted import read_small_file

TOKEN_ENV = "CENSUSVI_TOKEN"


class TokenError(ValueError):
    """The token file cannot be read or is empty; the message says which and how to fix it."""


MAX_TOKEN_BYTES = 4096


def _read_token_file(token_file: str) -> str:
    """The token in ``token_file``: a regular file of at most 4 KB of UTF-8 text (a device or a
    pipe named by mistake would be read forever or hang the start)."""
    path = Path(token_file).expanduser()
    hint = "name the file holding the token"
    raw = read_small_file(path, MAX_TOKEN_BYTES, "the token file", hint, TokenError)
    try:
        token = raw.decode().strip()
    except UnicodeDecodeError:
        raise TokenError(
            f"the token file {path} is not UTF-8 text: write the token in it"
        ) from None
    if not token:
        raise TokenError(f"the token file {path} is empty: write the token in it")
    return token


def token_digest(token: str | None = None, token_file: str | None = None) -> str | None:
    """SHA-256 (hex) of the configured token, or None for no authentication (no token given at
    all). A token given empty -- ``--token "$T"`` or ``--token-file "$F"`` with the variable
    unset, ``CENSUSVI_TOKEN=`` -- is refused rather than read as "no authentication"."""
    if token_file is not None:
        if not str(token_file).strip():
            raise TokenError(
                'the token file is named empty (--token-file "$VAR" with VAR unset?): name the '
                "file holding the token, or leave --token-file out to serve without authentication"
            )
        token = _read_token_file(str(token_file))
    elif token is None:
        token = os.environ.get(TOKEN_ENV)
        if token is not None and not token.strip():
            raise TokenError(
                f"{TOKEN_ENV} is set but empty: give it the token, or unset it to serve "
                "without authentication"
            )
    elif not isinstance(token, str) or not token.strip():
        raise TokenError(
            f'the token is {"empty" if isinstance(token, str) else "not text"} (--token "$VAR" '
            "with VAR unset?): give the token, or leave --token out to serve without "
            "authentication"
        )
    return hashlib.sha256(token.strip().encode()).hexdigest() if token is not None else None


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
