"""The per-task manifest: the single small document whose atomic replacement commits every change.

Both backends keep one manifest per (tenant, task) next to the version files (a JSON file on disk, a
JSON object in S3). It lists the retained versions with their sha256/size/creation time, the current
version, the highest version number ever committed, and the safetensors header of the current version
(so `info()` and listings never read tensor data). A deleted task keeps a *tombstone* manifest
(`current: null`, no versions) so that version numbers continue after re-creation instead of
restarting at 1: a replica that cached "v3" can never be handed a different "v3".

Everything here is pure: backends decide how a manifest is read, written and swapped.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, replace
from typing import Any

from prompt_store.artifact import ArtifactLimits, ArtifactMetadata, read_metadata
from prompt_store.base import CorruptArtifact, TaskInfo, VersionInfo
from prompt_store.errors import ArtifactError

__all__ = ["MANIFEST_FORMAT", "Manifest", "header_text", "parse_version_name", "version_name"]

MANIFEST_FORMAT = 1  # bump if the JSON layout changes incompatibly; readers refuse what they don't know
_VERSION_NAME = re.compile(r"v([0-9]{6,12})\.safetensors")
_LENGTH = struct.Struct("<Q")  # safetensors header length prefix
# Reading back headers we validated at upload: lowering the server's limits later must not make
# stored tasks unreadable.
_UNLIMITED = ArtifactLimits(
    max_bytes=2**62, max_prompt_length=2**31, max_classes=2**31, max_header_bytes=2**62
)


def version_name(version: int) -> str:
    """File / key name of a version: zero-padded so names sort in version order (up to 999,999)."""
    return f"v{version:06d}.safetensors"


def parse_version_name(name: str) -> int | None:
    """Inverse of `version_name`; None for any other name."""
    match = _VERSION_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def header_text(data: bytes) -> str:
    """The JSON header of an already validated safetensors buffer (tensor table + `__metadata__`)."""
    (n,) = _LENGTH.unpack_from(data, 0)
    return data[_LENGTH.size : _LENGTH.size + n].decode("utf-8")


@dataclass(frozen=True)
class Manifest:
    """State of one task. Immutable: every change builds a new manifest that is then swapped in."""

    tenant: str
    task_id: str
    last_version: int  # highest version number ever committed; the next put takes last_version + 1
    current: int | None  # version served by default; None means the task is deleted (tombstone)
    versions: tuple[VersionInfo, ...]  # retained versions, ascending; empty for a tombstone
    header: str | None  # safetensors JSON header of the current version; None for a tombstone
    updated: float  # Unix time of the change that wrote this manifest

    @property
    def deleted(self) -> bool:
        """True for a tombstone: the task was deleted; only its version counter survives."""
        return self.current is None

    def record(self, version: int) -> VersionInfo | None:
        """The retained version `version`, or None."""
        for info in self.versions:
            if info.version == version:
                return info
        return None

    def task_info(self) -> TaskInfo:
        """The public view of a live manifest; parses the stored header into `ArtifactMetadata`."""
        assert self.current is not None and self.header is not None, "task_info() of a tombstone"
        current = self.record(self.current)
        if current is None:
            raise CorruptArtifact(
                f"manifest of {self.tenant}/{self.task_id}: current version {self.current} not listed"
            )
        return TaskInfo(
            tenant=self.tenant,
            task_id=self.task_id,
            current=current,
            versions=self.versions,
            metadata=_metadata_from_header(self.header, f"{self.tenant}/{self.task_id}"),
        )

    # ---------------------------------------------------------------------------------- changes
    @staticmethod
    def after_put(
        previous: Manifest | None,
        tenant: str,
        task_id: str,
        info: VersionInfo,
        header: str,
        keep_versions: int,
    ) -> tuple[Manifest, list[int]]:
        """The manifest once `info` is committed and made current, and the version numbers it drops.

        Retention: the `keep_versions` highest versions stay; the new version is the highest and is
        current, so the current version is never pruned.
        """
        last = 0 if previous is None else previous.last_version
        assert info.version > last, f"version {info.version} must exceed the last committed {last}"
        older = () if previous is None else previous.versions
        everything = (*older, info)
        kept = everything[-keep_versions:]
        dropped = [v.version for v in everything[: len(everything) - len(kept)]]
        manifest = Manifest(
            tenant=tenant,
            task_id=task_id,
            last_version=info.version,
            current=info.version,
            versions=kept,
            header=header,
            updated=time.time(),
        )
        return manifest, dropped

    def with_current(self, version: int, header: str) -> Manifest:
        """The manifest with a retained `version` made current (rollback / roll-forward)."""
        assert self.record(version) is not None
        return replace(self, current=version, header=header, updated=time.time())

    def tombstone(self) -> Manifest:
        """The manifest of the deleted task: no versions, but the version counter is kept."""
        return replace(self, current=None, versions=(), header=None, updated=time.time())

    # ----------------------------------------------------------------------------- (de)serialise
    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, compact) as UTF-8."""
        doc = {
            "manifest": MANIFEST_FORMAT,
            "tenant": self.tenant,
            "task_id": self.task_id,
            "last_version": self.last_version,
            "current": self.current,
            "versions": [
                {"version": v.version, "sha256": v.sha256, "size": v.size, "created": v.created}
                for v in self.versions
            ],
            "header": self.header,
            "updated": self.updated,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; anything unexpected is `CorruptArtifact` naming `where` (tenant/task)."""
        try:
            doc = json.loads(data)
            if doc.get("manifest") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {doc.get('manifest')!r}")
            versions = tuple(
                VersionInfo(
                    version=_int(v["version"]),
                    sha256=str(v["sha256"]),
                    size=_int(v["size"]),
                    created=float(v["created"]),
                )
                for v in doc["versions"]
            )
            manifest = cls(
                tenant=str(doc["tenant"]),
                task_id=str(doc["task_id"]),
                last_version=_int(doc["last_version"]),
                current=None if doc["current"] is None else _int(doc["current"]),
                versions=versions,
                header=None if doc["header"] is None else str(doc["header"]),
                updated=float(doc["updated"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptArtifact(f"manifest of {where} is unreadable: {e}") from e
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        numbers = [v.version for v in self.versions]
        problems = []
        if numbers != sorted(set(numbers)):
            problems.append("versions are not strictly ascending")
        if numbers and numbers[-1] > self.last_version:
            problems.append("a version exceeds last_version")
        if self.current is not None and (self.current not in numbers or self.header is None):
            problems.append(f"current version {self.current} is not listed or has no header")
        if self.current is None and (numbers or self.header is not None):
            problems.append("a tombstone still lists versions")
        if problems:
            raise CorruptArtifact(f"manifest of {where} is inconsistent: {'; '.join(problems)}")


def _int(value: Any) -> int:
    # bool is an int subclass; a manifest saying "version": true is corrupt, not version 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _metadata_from_header(header: str, where: str) -> ArtifactMetadata:
    """Rebuild `ArtifactMetadata` from a stored header via the format's own parser.

    Going through `read_metadata(partial=True)` rather than serialising the dataclass keeps the
    manifest independent of ArtifactMetadata's field list (the format module stays the one parser).
    """
    raw = header.encode("utf-8")
    try:
        return read_metadata(_LENGTH.pack(len(raw)) + raw, _UNLIMITED, partial=True)
    except ArtifactError as e:
        raise CorruptArtifact(f"manifest of {where}: stored header does not parse ({e})") from e
