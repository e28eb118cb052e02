"""`Authorization: Bearer <credential>`: the one reading of that header, for API keys and the metrics
token alike (RFC 6750; the scheme is case-insensitive)."""

from __future__ import annotations

import hmac

from pydantic import SecretStr


def bearer_credential(authorization: str) -> str | None:
    """The credential of a `Bearer <credential>` header value; None for anything else."""
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None


def bearer_matches(secret: SecretStr, authorization: str) -> bool:
    """Whether a header value is `Bearer <secret>` (the credential compared in constant time)."""
    given = bearer_credential(authorization)
    return given is not None and hmac.compare_digest(given.encode(), secret.get_secret_value().encode())
