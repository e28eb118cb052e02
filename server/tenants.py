"""Tenants, roles, API keys and quotas, loaded from a TOML file (`VPT_TENANTS_FILE`).

```toml
[[tenant]]
name = "acme"                 # tenant id: [a-z0-9][a-z0-9._-]{0,63}, the namespace of its tasks
role = "tenant"               # "tenant" (own tasks only) or "admin" (may act on any tenant's tasks)
keys = ["sha256:9f86d0..."]   # SHA-256 of each API key, never the key itself (`vpt keygen`)
max_tasks = 1000              # tasks this tenant may store
max_artifact_bytes = 67108864 # bytes of one uploaded artifact
max_queued_images = 512       # images waiting in the scheduler at once (429 beyond)
rate_per_s = 100.0            # sustained requests per second (token bucket, burst = 2 s worth)
weight = 1.0                  # share of the engine under contention (weighted fair queuing)
```

Keys are 256-bit random tokens (`vpt_` + URL-safe base64), so a plain SHA-256 is a sufficient, fast
verifier (no password-style stretching needed: there is nothing to brute-force). Comparisons use
`hmac.compare_digest` over every configured hash, so timing reveals nothing about which key matched.
The file is re-read when its modification time changes (checked at most once a second) or on SIGHUP;
a file that fails to parse or validate is logged and the previous tenants stay in force.

`rotate_key` gives a tenant a new key in place of its old ones (`vpt keygen --rotate`): the file is
rewritten atomically, the rest of it as it was. The first start writes the admin key it creates to
`admin-key` beside the file (`admin_key_path`), mode 0600, so it is not lost with the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from prompt_store.base import InvalidId
from prompt_store.ids import check_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

KEY_PREFIX = "vpt_"
HASH_PREFIX = "sha256:"
Role = Literal["admin", "tenant"]


class TenantsFileError(ValueError):
    """The tenants file is unreadable or invalid; the message names the tenant and field."""


@dataclass(frozen=True)
class Tenant:
    name: str  # namespace of the tenant's tasks
    role: Role  # admin: may act on every tenant's tasks
    key_hashes: tuple[str, ...]  # "sha256:<hex>" of each API key
    max_tasks: int = 1000  # tasks the tenant may store
    max_artifact_bytes: int = 64 * 1024 * 1024  # bytes of one uploaded artifact
    max_queued_images: int = 512  # images waiting in the scheduler at once
    rate_per_s: float = 100.0  # sustained request rate (token bucket)
    weight: float = 1.0  # engine share under contention

    @property
    def burst(self) -> float:
        return max(1.0, 2.0 * self.rate_per_s)


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def keygen_line(tenant: str, role: Role = "tenant") -> tuple[str, str]:
    """A new key and the TOML to add to the tenants file for it."""
    check_id(tenant, "tenant")
    key = generate_key()
    toml = f'[[tenant]]\nname = "{tenant}"\nrole = "{role}"\nkeys = ["{hash_key(key)}"]\n'
    return key, toml


def admin_key_path(tenants_file: str | os.PathLike[str]) -> Path:
    """Where the first start keeps the admin key it created: `admin-key` beside the tenants file."""
    return Path(tenants_file).with_name("admin-key")


def write_atomic(path: Path, text: str, like: os.stat_result | None = None) -> None:
    """Write `path` atomically: a temporary file in its directory, fsynced, renamed over it. Mode 0600,
    or the mode and owner of `like` (the file being replaced)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if like is not None:
            os.chmod(tmp, stat.S_IMODE(like.st_mode))
            with contextlib.suppress(PermissionError):  # root rewriting a file the server's user owns
                os.chown(tmp, like.st_uid, like.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a crash once the directory is synced
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# A `[[tenant]]` header and a `keys = [...]` line (an array of hashes holds no "]").
_TENANT_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*tenant[ \t]*\]\]", re.M)
_KEYS_LINE = re.compile(r"^([ \t]*keys[ \t]*=[ \t]*)\[[^\]]*\]", re.M)


def rotate_key(path: str | os.PathLike[str], tenant: str) -> tuple[str, Tenant]:
    """Give `tenant` one new key in place of all its keys; returns the key and the tenant as it was.

    Only that tenant's `keys = [...]` changes: comments, order, quotas and the other tenants stay as
    written. The result is parsed back and must differ from the original in exactly those hashes, else
    nothing is written (`TenantsFileError`: edit the file by hand). Written atomically with the file's
    mode and owner kept, so a server re-reading it on its mtime sees the old file or the new one.
    """
    real = Path(os.path.realpath(path))  # a symlinked file is replaced where it lives
    text = real.read_text()
    before = parse_tenants(text, str(path))
    if tenant not in before:
        known = ", ".join(before) or "none"
        raise TenantsFileError(f"{path}: no tenant {tenant!r} to rotate (tenants: {known})")
    headers = list(_TENANT_HEADER.finditer(text))
    index = list(before).index(tenant)  # parse order is file order
    if len(headers) != len(before):
        raise TenantsFileError(
            f"{path}: its tenants are not all [[tenant]] tables; edit {tenant!r}'s keys by hand"
        )
    start = headers[index].end()
    end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
    key = generate_key()
    table, found = _KEYS_LINE.subn(lambda m: f'{m.group(1)}["{hash_key(key)}"]', text[start:end], count=1)
    new_text = text[:start] + table + text[end:]
    expected = {**before, tenant: replace(before[tenant], key_hashes=(hash_key(key),))}
    if found != 1 or parse_tenants(new_text, str(path)) != expected:
        raise TenantsFileError(f"{path}: cannot rewrite {tenant!r}'s keys line safely; edit it by hand")
    write_atomic(real, new_text, like=real.stat())
    return key, before[tenant]


_FIELDS = {
    "max_tasks": int,
    "max_artifact_bytes": int,
    "max_queued_images": int,
    "rate_per_s": float,
    "weight": float,
}


def parse_tenants(text: str, source: str = "tenants file") -> dict[str, Tenant]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TenantsFileError(f"{source}: invalid TOML: {e}") from None
    unknown = set(doc) - {"tenant"}
    if unknown:
        raise TenantsFileError(
            f"{source}: unknown top-level keys {sorted(unknown)}; expected [[tenant]] tables"
        )
    entries = doc.get("tenant", [])
    if not isinstance(entries, list):
        raise TenantsFileError(f"{source}: 'tenant' must be an array of tables ([[tenant]])")
    tenants: dict[str, Tenant] = {}
    seen_hashes: dict[str, str] = {}
    for i, t in enumerate(entries):
        where = f"{source}: tenant #{i + 1}"
        if not isinstance(t, dict):
            raise TenantsFileError(f"{where}: must be a table")
        try:
            name = check_id(t.get("name"), "tenant")
        except InvalidId as e:
            raise TenantsFileError(f"{where}: name: {e}") from None
        where = f"{source}: tenant {name!r}"
        if name in tenants:
            raise TenantsFileError(f"{where}: defined twice")
        extra = set(t) - {"name", "role", "keys", *_FIELDS}
        if extra:
            raise TenantsFileError(f"{where}: unknown fields {sorted(extra)}")
        role = t.get("role", "tenant")
        if role not in ("admin", "tenant"):
            raise TenantsFileError(f"{where}: role must be 'admin' or 'tenant', not {role!r}")
        keys = t.get("keys", [])
        if not isinstance(keys, list) or not keys:
            raise TenantsFileError(f"{where}: keys must be a non-empty list of 'sha256:<hex>' hashes")
        for k in keys:
            if not (isinstance(k, str) and k.startswith(HASH_PREFIX) and len(k) == len(HASH_PREFIX) + 64):
                hint = (
                    " (it looks like a plaintext key: store hash_key(key))"
                    if str(k).startswith(KEY_PREFIX)
                    else ""
                )
                raise TenantsFileError(
                    f"{where}: keys: {str(k)[:12]!r}... is not a sha256:<64 hex> hash{hint}"
                )
            try:
                int(k[len(HASH_PREFIX) :], 16)
            except ValueError:
                raise TenantsFileError(f"{where}: keys: {k[:16]!r}... is not hexadecimal") from None
            if k in seen_hashes:
                raise TenantsFileError(f"{where}: a key is also listed for tenant {seen_hashes[k]!r}")
            seen_hashes[k] = name
        quotas = {}
        for fname, typ in _FIELDS.items():
            if fname in t:
                v = t[fname]
                if (
                    isinstance(v, bool)
                    or not isinstance(v, int | float)
                    or v <= 0
                    or (typ is int and not isinstance(v, int))
                ):
                    raise TenantsFileError(f"{where}: {fname} must be a positive {typ.__name__}, not {v!r}")
                quotas[fname] = typ(v)
        tenants[name] = Tenant(name=name, role=role, key_hashes=tuple(keys), **quotas)
    return tenants


@dataclass
class TenantRegistry:
    """The tenants in force; authenticates keys; reloads its file on change or on request."""

    path: Path | None  # None = open mode (no keys)
    tenants: dict[str, Tenant] = field(default_factory=dict)
    _mtime: float = 0.0
    _checked: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TenantRegistry:
        p = Path(path)
        try:
            text, mtime = p.read_text(), p.stat().st_mtime
        except OSError as e:
            raise TenantsFileError(f"cannot read tenants file {p}: {e}") from None
        reg = cls(path=p, tenants=parse_tenants(text, str(p)), _mtime=mtime, _checked=time.monotonic())
        log.info("loaded %d tenants from %s", len(reg.tenants), p)
        return reg

    def reload(self) -> bool:
        """Re-read the file now; keep the old tenants if the new file is invalid. True if changed."""
        if self.path is None:
            return False
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
                tenants = parse_tenants(self.path.read_text(), str(self.path))
            except (OSError, TenantsFileError) as e:
                log.error("tenants file not reloaded, keeping the previous tenants: %s", e)
                self._checked = time.monotonic()
                return False
            self.tenants, self._mtime, self._checked = tenants, mtime, time.monotonic()
        log.info("reloaded %d tenants from %s", len(tenants), self.path)
        return True

    def maybe_reload(self, interval_s: float = 1.0) -> None:
        """Cheap change detection on the request path: stat the file at most once per interval."""
        if self.path is None or time.monotonic() - self._checked < interval_s:
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            self._checked = time.monotonic()
            return
        if mtime != self._mtime:
            self.reload()
        else:
            self._checked = time.monotonic()

    def authenticate(self, key: str) -> Tenant | None:
        presented = hash_key(key)
        found = None
        for tenant in self.tenants.values():
            for h in tenant.key_hashes:
                if hmac.compare_digest(presented, h):
                    found = tenant  # keep looping: same work whichever key matches
        return found

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)
