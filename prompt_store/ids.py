"""Tenant and task identifiers: one rule for both, safe as a path segment and as an S3 key segment.

The rule is ``[a-z0-9][a-z0-9._-]{0,63}`` (ASCII only, 1–64 characters):

- no ``/`` or ``\\`` and no leading ``.``, so ``.``, ``..``, ``../x`` and ``a/b`` cannot walk out of a
  tenant's namespace, on disk or in a bucket;
- lowercase only, so two ids never collide on a case-insensitive file system (macOS, Windows shares)
  and never differ only in case in a URL;
- ASCII only, so no Unicode normalisation form can make two spellings name one directory.
"""

from __future__ import annotations

import re

__all__ = ["ID_MAX_LEN", "ID_PATTERN", "check_id", "listing_key"]

ID_MAX_LEN = 64
# `re.ASCII` keeps `[a-z0-9]` from ever matching non-ASCII digits; fullmatch rejects a trailing "\n",
# which a `$` anchor would let through.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)


def check_id(value: object, kind: str = "task_id") -> str:
    """Return ``value`` unchanged if it is a valid tenant or task id, else raise `base.InvalidId`.

    Args:
        value: the candidate id (anything; non-strings are rejected).
        kind: what the id names ("tenant" or "task_id"); used in the error message and ``.field``.
    """
    if not isinstance(value, str):
        raise _invalid(kind, f"{kind} must be a string, got {type(value).__name__}")
    if ID_PATTERN.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise _invalid(
            kind,
            f"invalid {kind} {shown!r}: use 1-{ID_MAX_LEN} characters from [a-z0-9._-], "
            "starting with a lowercase letter or digit",
        )
    return value


def _invalid(kind: str, message: str) -> Exception:
    # base.py (home of the store's errors) imports this module, so import back only on the error path.
    from prompt_store.base import InvalidId

    return InvalidId(kind, message)


def listing_key(task_id: str) -> str:
    """Sort key that orders task ids the way S3 orders their key prefixes (``<task_id>/``).

    Both backends page through tasks in this order so a cursor means the same thing everywhere:
    ``"a-b" < "a" < "a_b"`` because ``"-" < "/" < "_"`` in byte order.
    """
    return task_id + "/"
