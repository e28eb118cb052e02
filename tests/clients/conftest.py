"""One real `vpt-serve` (tiny random backbone, tenants file with keys) for the SDK integration, CLI
and browser tests: started once per session on 127.0.0.1, stopped with SIGTERM (must exit 0).

Tenants: `acme` and `beta` (role tenant), `gallery` (the browser test's own, so its task list is
known), `slow` (1 request/s: exercises 429 + Retry-After) and `root` (admin). Each test module uses
its own task ids, so modules do not depend on each other's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from server.tenants import keygen_line
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes
from tests.server.server_proc import ServerProcess
from vpt.hub import Backbone, load_backbone

TENANTS = {"acme": "tenant", "beta": "tenant", "gallery": "tenant", "slow": "tenant", "root": "admin"}


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    keys: dict[str, str]  # tenant name → its API key
    backbone: Backbone  # the server's backbone, loaded here too (artifacts, reference results)
    proc: ServerProcess

    def artifact(self, *, seed: int, P: int = 2, mode: str = "deep", C: int = 4, labels=None) -> bytes:
        return artifact_bytes(self.backbone, P=P, mode=mode, C=C, seed=seed, labels=labels)


@pytest.fixture(scope="session")
def live(tmp_path_factory) -> Live:
    tmp: Path = tmp_path_factory.mktemp("live")
    keys, entries = {}, []
    for name, role in TENANTS.items():
        keys[name], toml = keygen_line(name, role)  # type: ignore[arg-type]
        entries.append(toml + ("rate_per_s = 1.0\n" if name == "slow" else ""))
    (tmp / "tenants.toml").write_text("".join(entries))
    proc = ServerProcess(
        tmp,
        backbone=BACKBONE_SPEC,
        open_mode="false",
        tenants_file=tmp / "tenants.toml",
        max_prompt_length=16,
        access_log="false",
    ).wait_ready()
    try:
        yield Live(url=proc.url, keys=keys, backbone=load_backbone(BACKBONE_SPEC), proc=proc)
    finally:
        assert proc.stop() == 0, proc.log()
