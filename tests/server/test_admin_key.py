"""The first start's admin key cannot be lost, and any tenant's key can be replaced.

- The first start (no tenants file) writes the admin key to `admin-key` beside the tenants file, mode
  0600, and prints it at every start while that file exists (real `vpt-serve` processes).
- `vpt keygen` refuses a name the tenants file already has; `vpt keygen --rotate` replaces that
  tenant's keys in the file atomically, the rest of it byte for byte as it was, and a running server
  then refuses the old key and accepts the new one (it re-reads the file on its mtime).
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time

import httpx
import pytest

from clients.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from server.tenants import TenantsFileError, admin_key_path, hash_key, parse_tenants, rotate_key
from tests.server.helpers import BACKBONE_SPEC
from tests.server.server_proc import ServerProcess

PRINTED_KEY = re.compile(r"^\s+(vpt_[A-Za-z0-9_-]{40,})\s*$", re.M)  # as tests/test_readme.py reads it
OTHERS = """# quotas agreed with acme, 2026-11
[[tenant]]
name = "acme"
role = "tenant"
keys = [
  "sha256:{a}",  # laptop
  "sha256:{b}",
]
rate_per_s = 5.0

[[tenant]]
name = "zeta"   # no role: tenant
keys = ["sha256:{c}"]
"""


def others() -> str:
    return OTHERS.format(a="a" * 64, b="b" * 64, c="c" * 64)


def info(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/info", headers={"authorization": f"Bearer {key}"}, timeout=10).status_code


def vpt(*argv: str) -> subprocess.CompletedProcess[str]:
    """The `vpt` command line in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *argv], capture_output=True, text=True, timeout=120
    )


def test_rotate_replaces_only_the_tenants_keys(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(others())
    path.chmod(0o640)
    key, old = rotate_key(path, "acme")
    assert old.key_hashes == ("sha256:" + "a" * 64, "sha256:" + "b" * 64)
    new_text = path.read_text()
    assert new_text == others().replace(
        f'keys = [\n  "sha256:{"a" * 64}",  # laptop\n  "sha256:{"b" * 64}",\n]',
        f'keys = ["{hash_key(key)}"]',
    )
    tenants = parse_tenants(new_text)
    assert tenants["acme"].key_hashes == (hash_key(key),) and tenants["acme"].rate_per_s == 5.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the file's own mode, kept
    assert [p.name for p in tmp_path.iterdir()] == ["tenants.toml"]  # no temporary file left

    key2, _ = rotate_key(path, "zeta")  # the last table, a comment on its name line
    assert parse_tenants(path.read_text())["zeta"].key_hashes == (hash_key(key2),)
    assert parse_tenants(path.read_text())["acme"].key_hashes == (hash_key(key),)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, "no tenant 'nobody' to rotate (tenants: acme, zeta)"),
        ('tenant = [{name = "nobody", keys = ["sha256:' + "d" * 64 + '"]}]\n', "edit 'nobody'"),
    ],
)
def test_rotate_refuses_and_leaves_the_file_alone(tmp_path, text, words):
    path = tmp_path / "tenants.toml"
    path.write_text(text or others())
    before = path.read_bytes()
    with pytest.raises(TenantsFileError, match=re.escape(words)):
        rotate_key(path, "nobody")
    assert path.read_bytes() == before


def test_keygen_refuses_a_name_the_tenants_file_has(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tenants.toml"
    path.write_text(others())
    assert main(["keygen", "--tenant", "acme", "--tenants-file", str(path)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "tenant 'acme' is already in" in err and "vpt keygen --rotate --tenant acme" in err
    monkeypatch.setenv("VPT_TENANTS_FILE", str(path))  # the server's setting is keygen's default too
    assert main(["keygen", "--tenant", "zeta"]) == EXIT_ERROR
    assert "tenant 'zeta' is already in" in capsys.readouterr().err
    assert main(["keygen", "--tenant", "newco"]) == EXIT_OK
    assert path.read_text() == others()  # keygen without --rotate only prints
    for argv, words in (
        (["--role", "admin"], "--rotate keeps the tenant's role"),
        (["--tenants-file", str(tmp_path / "missing.toml")], "no tenants file"),
    ):
        with pytest.raises(SystemExit) as e:  # argparse's usage error
            main(["keygen", "--rotate", "--tenant", "acme", *argv])
        assert e.value.code == EXIT_USAGE and words in capsys.readouterr().err


@pytest.mark.integration
def test_first_start_admin_key_is_kept_shown_and_rotated(tmp_path):
    data = tmp_path / "data"
    tenants = data / "tenants.toml"
    key_file = admin_key_path(tenants)
    settings = {"backbone": BACKBONE_SPEC, "open_mode": "false", "tenants_file": tenants}

    # First start: the tenants file and the key file, both 0600; the printed key is the file's, and works.
    server = ServerProcess(tmp_path, **settings).wait_ready()
    try:
        printed = PRINTED_KEY.findall(server.log())
        key = key_file.read_text().strip()
        assert printed == [key], server.log()
        assert key_file == data / "admin-key"
        for p in (tenants, key_file):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert info(server.url, key) == 200 and info(server.url, "vpt_" + "x" * 43) == 401
    finally:
        assert server.stop() == 0

    # Second start: shown again, as long as the file exists.
    tenants.write_text(tenants.read_text() + others())  # other tenants added meanwhile
    server = ServerProcess(tmp_path, **settings).wait_ready()
    try:
        assert PRINTED_KEY.findall(server.log()) == [key], server.log()
        assert f"also in {key_file}" in server.log()
        # A duplicate name is refused; --rotate replaces the admin's key in the running server's file.
        dup = vpt("keygen", "--tenant", "admin", "--tenants-file", str(tenants))
        assert dup.returncode == EXIT_ERROR and "already in" in dup.stderr
        rotated = vpt("keygen", "--rotate", "--tenant", "admin", "--tenants-file", str(tenants))
        assert rotated.returncode == EXIT_OK, rotated.stderr
        (new_key,) = PRINTED_KEY.findall(rotated.stdout)
        assert f"Removed {key_file}: it held the old key." in rotated.stdout
        assert not key_file.exists()
        assert stat.S_IMODE(tenants.stat().st_mode) == 0o600
        assert parse_tenants(tenants.read_text())["acme"].rate_per_s == 5.0  # the rest kept
        deadline = time.monotonic() + 10  # re-read on the mtime, checked at most once a second
        while info(server.url, key) != 401:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        assert info(server.url, new_key) == 200
    finally:
        assert server.stop() == 0

    # Third start: the file is gone, so nothing is printed.
    server = ServerProcess(tmp_path, **settings).wait_ready()
    try:
        assert PRINTED_KEY.findall(server.log()) == [], server.log()
        assert info(server.url, new_key) == 200
    finally:
        assert server.stop() == 0
