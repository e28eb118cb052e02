"""`vpt` commands over the SDK, through `clients.cli.main` (and once through the installed console
script), against the real server of tests/clients/conftest.py: output, `--json`, and exit statuses;
`vpt train --upload` / `vpt import-official --upload` answer with the same statuses as `vpt upload`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from clients import errors
from clients.cli import (
    EXIT_AUTH,
    EXIT_BUSY,
    EXIT_CONNECTION,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    exit_status,
    main,
)
from clients.cli_remote import ProgressBody
from server.tenants import hash_key, parse_tenants
from tests.server.helpers import png_bytes
from tests.server.server_proc import free_port
from tests.server.test_api import expected_probs

pytestmark = pytest.mark.integration
LABELS = ["apple", "banana", "cherry", "damson", "elder"]


@pytest.fixture
def acme(live, monkeypatch):
    """The environment a user of tenant acme would have."""
    monkeypatch.setenv("VPT_URL", live.url)
    monkeypatch.setenv("VPT_API_KEY", live.keys["acme"])
    return live


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        (d / f"img{i}.png").write_bytes(png_bytes(i))
    (d / "sub" / "deep.png").write_bytes(png_bytes(9))
    (d / "notes.txt").write_text("not an image")
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_upload_tasks_classify_rollback_delete(acme, images, tmp_path, capsys):
    v1, v2 = acme.artifact(seed=10, C=5, labels=LABELS), acme.artifact(seed=11, C=5, labels=LABELS)
    (tmp_path / "v1.safetensors").write_bytes(v1)
    (tmp_path / "v2.safetensors").write_bytes(v2)

    rc, out, _ = run(capsys, "upload", "fruit", str(tmp_path / "v1.safetensors"))
    assert rc == EXIT_OK and out.startswith("created acme/fruit: version ")
    version1 = int(out.split("version ")[1].split(",")[0])
    rc, out, _ = run(capsys, "upload", "fruit", str(tmp_path / "v2.safetensors"), "--json", "-q")
    assert rc == EXIT_OK
    info = json.loads(out)
    assert info["version"] > version1 and info["labels"] == LABELS

    rc, out, _ = run(capsys, "tasks", "list")
    header, *rows = out.splitlines()
    assert header.split() == ["TASK", "VERSION", "MODE", "P", "CLASSES", "SIZE", "UPDATED", "NAME"]
    assert any(r.split()[:5] == ["fruit", f"v{info['version']}", "deep", "2", "5"] for r in rows)
    rc, out, _ = run(capsys, "tasks", "list", "--json", "--limit", "1")
    assert rc == EXIT_OK and len(json.loads(out)) == 1

    rc, out, _ = run(capsys, "tasks", "show", "fruit")
    assert rc == EXIT_OK
    assert "acme/fruit" in out and ", ".join(LABELS) in out
    assert f"retained: {version1}, {info['version']}" in out

    # Files, a quoted glob (recursive) and a directory (its images only, not notes.txt).
    rc, out, err = run(
        capsys, "classify", "fruit", str(images / "img0.png"), f"{images}/**/deep.png", str(images), "-k", "2"
    )
    assert rc == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "SCORE"]
    assert len(lines) == 1 + 2 * 5  # five images (img0 twice), two labels each
    assert f"task fruit v{info['version']} · 5 image(s)" in err
    first_label, first_score = lines[1].split()[1:3]
    probs = expected_probs(acme.backbone, v2, png_bytes(0))
    assert first_label == LABELS[int(probs.argmax())]
    assert float(first_score) == pytest.approx(float(probs.max()), abs=1e-3)
    assert "█" in lines[1] or float(first_score) < 1 / 20

    rc, out, _ = run(capsys, "classify", "fruit", str(images), "--json", "--batch", "2", "--top-k", "1")
    doc = json.loads(out)
    assert rc == EXIT_OK and doc["task_id"] == "fruit"
    assert [Path(r["file"]).name for r in doc["results"]] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(r["predictions"]) == 1 and r["version"] == info["version"] for r in doc["results"])

    rc, out, _ = run(capsys, "tasks", "rollback", "fruit", str(version1))
    assert rc == EXIT_OK and out.strip() == f"acme/fruit: version {version1} is current"
    rc, out, _ = run(capsys, "classify", "fruit", str(images / "img0.png"), "--json")
    assert json.loads(out)["results"][0]["version"] == version1

    rc, out, _ = run(capsys, "tasks", "delete", "fruit")
    assert rc == EXIT_OK and out.strip() == "deleted fruit"
    rc, _, err = run(capsys, "tasks", "show", "fruit")
    assert rc == EXIT_NOT_FOUND
    assert err.strip() == "vpt tasks show: error: 404 not_found: task acme/fruit not found"


def test_info_and_global_options_before_or_after_the_command(live, monkeypatch, capsys):
    monkeypatch.delenv("VPT_URL", raising=False)
    monkeypatch.delenv("VPT_API_KEY", raising=False)
    key = live.keys["acme"]
    rc, out, _ = run(capsys, "--url", live.url, "--api-key", key, "info")
    assert rc == EXIT_OK
    assert f"server       {live.url}" in out and "random:vit_test_tiny@0" in out
    assert live.backbone.fingerprint in out
    rc, out, _ = run(capsys, "info", "--json", "--url", live.url, "--api-key", key)
    assert json.loads(out)["backbone"]["image_size"] == 32


def test_admin_acts_for_a_tenant(live, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VPT_URL", live.url)
    (tmp_path / "a.safetensors").write_bytes(live.artifact(seed=12))
    root = ["--api-key", live.keys["root"], "--tenant", "beta"]
    assert run(capsys, *root, "upload", "for-beta", str(tmp_path / "a.safetensors"))[0] == EXIT_OK
    rc, out, _ = run(capsys, "tasks", "list", "--json", "--api-key", live.keys["beta"])
    assert [t["task_id"] for t in json.loads(out)] == ["for-beta"]
    rc, _, err = run(capsys, "tasks", "list", "--api-key", live.keys["acme"], "--tenant", "beta")
    assert rc == EXIT_AUTH and "403 forbidden" in err
    assert run(capsys, *root, "tasks", "delete", "for-beta", "--yes")[0] == EXIT_OK


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["tasks", "show", "nope"], EXIT_NOT_FOUND, "error: 404 not_found: task acme/nope not found"),
        (["tasks", "rollback", "nope", "1"], EXIT_NOT_FOUND, "error: 404 not_found: "),
        (["upload", "junk", "{tmp}/junk.safetensors"], EXIT_ERROR, "error: 422 invalid_artifact: "),
        (["classify", "nope", "{tmp}/ok.png"], EXIT_NOT_FOUND, "error: 404 not_found: "),
        (["tasks", "show", "Bad"], EXIT_ERROR, "error: 400 invalid_task_id: "),
        (["--api-key", "vpt_wrong", "tasks", "list"], EXIT_AUTH, "error: 401 unauthorized: invalid API key"),
        (
            ["--url", "http://127.0.0.1:{port}", "info"],
            EXIT_CONNECTION,
            "error: connection_failed: cannot reach",
        ),
        (["classify", "t", "{tmp}/missing.png"], EXIT_USAGE, "error: no such file: "),
        (["classify", "t", "{tmp}/*.jpg"], EXIT_USAGE, "error: no files match "),
        (["upload", "t", "{tmp}/missing.safetensors"], EXIT_USAGE, "error: no such file: "),
        (["classify", "t"], EXIT_USAGE, "error: the following arguments are required: FILE"),
        (["tasks"], EXIT_USAGE, "error: the following arguments are required: ACTION"),
        (["keygen", "--tenant", "Not Valid"], EXIT_USAGE, "error: invalid tenant name 'Not Valid'"),
    ],
)
def test_exit_status_and_one_line_error(acme, tmp_path, capsys, argv, status, message):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    (tmp_path / "ok.png").write_bytes(png_bytes(0))
    argv = [a.format(tmp=tmp_path, port=free_port()) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == status, err
    assert out == ""
    last = err.strip().splitlines()[-1]  # usage errors print the usage lines first
    assert message in last and last.startswith("vpt ")
    if status != EXIT_USAGE:
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.Overloaded("queue full", status=429), EXIT_BUSY),
        (errors.Unavailable("draining", status=503), EXIT_BUSY),
        (errors.StoreUnavailable("s3 down", status=503), EXIT_BUSY),
        (errors.DeadlineExceeded("waited 30 s", status=504), EXIT_BUSY),
        (errors.QuotaExceeded("max 10 tasks", status=403), EXIT_ERROR),
        (errors.CorruptArtifact("checksum", status=503), EXIT_ERROR),
        (errors.InternalError("boom", status=500), EXIT_ERROR),
        (errors.Forbidden("admins only", status=403), EXIT_AUTH),
        (errors.MethodNotAllowed("GET is not allowed", status=405), EXIT_ERROR),
        (errors.HTTPError("bad", status=400), EXIT_ERROR),
        (errors.Timeout("timed out after 60 s waiting for the reply"), EXIT_CONNECTION),
        (errors.ConnectionFailed("RemoteProtocolError"), EXIT_CONNECTION),
        (httpx.ReadTimeout("timed out"), EXIT_CONNECTION),
        (FileNotFoundError(2, "No such file"), EXIT_ERROR),
        (ValueError("a bug"), None),  # not an expected error: the traceback is shown
    ],
)
def test_exit_status_of_each_error(error, status):
    """The statuses no real reply above produces (a busy server, a quota, a dropped connection)."""
    assert exit_status(error) == status


@pytest.fixture(scope="module")
def producers(tmp_path_factory) -> dict[str, list[str]]:
    """`vpt train` and `vpt import-official` argv (less `--out`) that write a small artifact for the
    live server's backbone, in a few seconds: 2 classes x 2 images, one epoch; a zero prompt file."""
    d = tmp_path_factory.mktemp("producers")
    for c, cls in enumerate(("ant", "bee")):
        (d / "photos" / cls).mkdir(parents=True)
        for i in range(2):
            (d / "photos" / cls / f"{i}.png").write_bytes(png_bytes(10 * c + i))
    torch.save({"shallow_prompt": np.zeros((1, 2, 64), dtype=np.float32)}, d / "prompt_ep1.pth")
    torch.save({"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, d / "head.pth")
    spec = "random:vit_test_tiny@0"  # the live server's backbone (tests/server/helpers.BACKBONE_SPEC)
    train = ["train", "--backbone", spec, "--data", str(d / "photos"), "--val-split", "0", "--epochs", "1"]
    train += ["--batch-size", "4", "--prompt-length", "2", "--workers", "0", "-q"]
    official = [
        "import-official",
        str(d / "prompt_ep1.pth"),
        "--backbone",
        spec,
        "--head",
        str(d / "head.pth"),
    ]
    return {"train": train, "import-official": official}


@pytest.mark.parametrize("failure", ["unreachable", "bad key"])
def test_train_and_import_official_upload_exit_like_vpt_upload(
    live, producers, tmp_path, monkeypatch, capsys, failure
):
    """`--upload` goes through the SDK: same message and exit status as `vpt upload` (issue: it used
    raw httpx, so every failure exited 1)."""
    monkeypatch.delenv("VPT_URL", raising=False)
    monkeypatch.delenv("VPT_API_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}" if failure == "unreachable" else live.url
    (tmp_path / "a.safetensors").write_bytes(live.artifact(seed=15))
    key = ["--api-key", "vpt_wrong"]
    rc, _, err = run(capsys, "upload", "up-exit", str(tmp_path / "a.safetensors"), "--url", url, *key)
    assert rc == {"unreachable": EXIT_CONNECTION, "bad key": EXIT_AUTH}[failure], err
    message = err.split(": error: ", 1)[1]
    for name, argv in producers.items():
        out = tmp_path / f"{name}.safetensors"
        upload = ["--upload", url, "--task", "up-exit", *key]
        assert run(capsys, *argv, "--out", str(out), *upload)[::2] == (rc, f"vpt {name}: error: {message}")
        assert out.is_file()  # written before the upload: it can be retried with `vpt upload`


def test_train_and_import_official_upload_to_a_real_server(live, producers, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VPT_API_KEY", live.keys["root"])
    for name, argv in producers.items():
        task = f"up-{name}"
        # --tenant applies to the upload (an admin uploading for beta), before the command or after it.
        before, after = (["--tenant", "beta"], []) if name == "train" else ([], ["--tenant", "beta"])
        rc, out, err = run(
            capsys, *before, *argv, "--out", str(tmp_path / "t"), "--upload", live.url, "--task", task, *after
        )
        assert rc == EXIT_OK, err
        info = json.loads(out[out.index("\n{") :])
        assert (info["tenant"], info["task_id"], info["num_classes"]) == (
            "beta",
            task,
            {"train": 2}.get(name, 3),
        )
        with httpx.Client(base_url=live.url, headers={"authorization": f"Bearer {live.keys['beta']}"}) as c:
            assert c.get(f"/v1/tasks/{task}").json()["version"] == info["version"]
            assert c.delete(f"/v1/tasks/{task}").status_code == 204


def test_train_takes_the_servers_backbone(live, producers, tmp_path, monkeypatch, capsys):
    """Without --backbone, `vpt train` asks the server (GET /v1/info) for its backbone and input side, so
    what it writes is what that server accepts; `--upload` alone sends it there ($VPT_URL)."""
    monkeypatch.setenv("VPT_URL", live.url)
    monkeypatch.setenv("VPT_API_KEY", live.keys["acme"])
    argv = producers["train"]
    assert argv[1:3] == ["--backbone", "random:vit_test_tiny@0"]
    argv = [argv[0], *argv[3:]]
    out = tmp_path / "t.safetensors"
    rc, stdout, err = run(capsys, *argv, "--out", str(out), "--upload", "--task", "from-server")
    assert rc == EXIT_OK, err
    assert f"backbone: random:vit_test_tiny@0 at 32x32 (the server's, {live.url})" in err
    info = json.loads(stdout[stdout.index("\n{") :])
    assert (info["tenant"], info["task_id"], info["version"]) == ("acme", "from-server", 1)
    assert info["backbone_fingerprint"] == live.backbone.fingerprint
    assert run(capsys, "tasks", "delete", "from-server", "--yes")[0] == EXIT_OK

    # No server to ask: one line that says what to do instead, and nothing written.
    monkeypatch.setenv("VPT_URL", f"http://127.0.0.1:{free_port()}")
    rc, _, err = run(capsys, *argv, "--out", str(tmp_path / "none.safetensors"))
    assert rc == EXIT_CONNECTION and len(err.splitlines()) == 1
    assert err.startswith("vpt train: error: connection_failed: no --backbone given, and the server at ")
    assert "pass --backbone SPEC (`vpt presets` lists the random: ones)" in err and "$VPT_URL" in err
    assert not (tmp_path / "none.safetensors").exists()

    # A server that wants a key: its 401, what was being asked, and where a key goes.
    monkeypatch.delenv("VPT_API_KEY")
    rc, _, err = run(capsys, "--url", live.url, *argv, "--out", str(tmp_path / "none.safetensors"))
    assert rc == EXIT_AUTH
    assert err.startswith(f"vpt train: error: 401 unauthorized: asking {live.url} for its backbone")
    assert err.endswith("; set VPT_API_KEY=<key> or pass --api-key <key>\n")


def test_a_refused_key_says_where_a_key_goes(live, monkeypatch, capsys):
    """The server's 401 speaks of headers; the CLI adds which key it sent, or where to put one."""
    monkeypatch.setenv("VPT_URL", live.url)
    monkeypatch.delenv("VPT_API_KEY", raising=False)
    rc, _, err = run(capsys, "tasks", "list")
    assert rc == EXIT_AUTH
    assert err.startswith("vpt tasks list: error: 401 unauthorized: missing API key: send the header ")
    assert err.endswith("; set VPT_API_KEY=<key> or pass --api-key <key>\n")
    monkeypatch.setenv("VPT_API_KEY", "vpt_wrong")
    message = "error: 401 unauthorized: invalid API key"
    assert run(capsys, "info")[::2] == (EXIT_AUTH, f"vpt info: {message} (from $VPT_API_KEY)\n")
    assert run(capsys, "info", "--api-key", "x")[::2] == (
        EXIT_AUTH,
        f"vpt info: {message} (from --api-key)\n",
    )


def test_invalid_image_names_the_file(acme, tmp_path, capsys):
    (tmp_path / "a.safetensors").write_bytes(acme.artifact(seed=13))
    assert run(capsys, "upload", "img-err", str(tmp_path / "a.safetensors"), "-q")[0] == EXIT_OK
    (tmp_path / "good.png").write_bytes(png_bytes(1))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rc, _, err = run(capsys, "classify", "img-err", str(tmp_path / "good.png"), str(tmp_path / "broken.png"))
    assert rc == EXIT_ERROR
    assert err.startswith(f"vpt classify: error: 400 invalid_image: {tmp_path / 'broken.png'}: ")
    run(capsys, "tasks", "delete", "img-err")


def test_keygen_prints_a_key_and_its_tenants_entry(capsys):
    rc, out, _ = run(capsys, "keygen", "--tenant", "newco", "--json")
    doc = json.loads(out)
    assert rc == EXIT_OK and doc["key"].startswith("vpt_") and doc["role"] == "tenant"
    tenants = parse_tenants(doc["toml"])
    assert tenants["newco"].key_hashes == (hash_key(doc["key"]),)

    rc, out, _ = run(capsys, "keygen", "--tenant", "ops", "--role", "admin")
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("vpt_"))
    toml = out[out.index("[[tenant]]") :]
    assert parse_tenants(toml)["ops"].role == "admin"
    assert parse_tenants(toml)["ops"].key_hashes == (hash_key(key),)
    assert out.count(key) == 1  # shown once, and only the hash goes into the file


def test_upload_progress_body_reports_every_byte_and_restarts_on_retry():
    seen: list[int] = []
    starts: list[int] = []
    body = ProgressBody(b"x" * 250, lambda: starts.append(1), seen.append, chunk=100)
    assert b"".join(body) == b"x" * 250 and seen == [100, 100, 50]
    assert b"".join(body) == b"x" * 250 and len(starts) == 2  # re-iterable: a retry sends it again


def test_help_lists_commands_and_exit_statuses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for cmd in ("classify", "upload", "tasks", "info", "train", "import-official", "presets", "keygen"):
        assert f"    {cmd}" in out
    assert "exit status:" in out and "3  connection failure" in out and "VPT_API_KEY" in out
    with pytest.raises(SystemExit):
        main(["tasks", "rollback", "--help"])
    assert "exit status:" in capsys.readouterr().out


def test_console_script(live, tmp_path):
    """The installed `vpt` entry point: a real process, its stdout and its exit status."""
    vpt = shutil.which("vpt", path=str(Path(sys.executable).parent))
    assert vpt, "the vpt console script is not installed (pip install -e .)"
    env = {"VPT_URL": live.url, "VPT_API_KEY": live.keys["beta"], "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run(
        [vpt, "tasks", "list", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)
    proc = subprocess.run(
        [vpt, "tasks", "show", "ghost"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_NOT_FOUND
    assert proc.stderr == "vpt tasks show: error: 404 not_found: task beta/ghost not found\n"
