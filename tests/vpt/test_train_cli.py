"""`vpt train` through `clients.cli.main`: ImageFolder / CSV in, validated artifact out, upload.

The upload tests answer from a real HTTP server on 127.0.0.1 (http.server in a thread) that records
the request: method, path, headers and body are checked byte for byte. The end-to-end check against a
real `vpt-serve` (predictions equal the trainer's) lives with the server's integration tests.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from clients.cli import build_parser, main
from prompt_store.artifact import read_artifact, validate_for_backbone
from vpt.hub import load_backbone
from vpt.train.job import signature

SPEC = "random:vit_test_tiny@0"
FAST = ["--epochs", "2", "--batch-size", "16", "--prompt-length", "2", "--lr", "1", "-q"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """ImageFolder of 8x8 digit PNGs: 10 classes x 8 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digits")
    counts: dict[int, int] = {}
    for img, t in zip(d.images, d.target, strict=True):
        t = int(t)
        if counts.get(t, 0) >= 8:
            continue
        counts[t] = counts.get(t, 0) + 1
        (root / f"digit{t}").mkdir(exist_ok=True)
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(
            root / f"digit{t}" / f"{counts[t]}.png"
        )
    return root


@pytest.fixture(scope="module")
def bb():
    return load_backbone(SPEC)


def test_train_imagefolder_end_to_end(digit_folder, bb, tmp_path, capsys):
    out = tmp_path / "task.safetensors"
    rc = main(
        [
            "train",
            "--backbone",
            SPEC,
            "--data",
            str(digit_folder),
            "--out",
            str(out),
            *FAST,
            "--name",
            "digits",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "== vpt train report ==" in stdout and "val accuracy" in stdout and "artifact bytes" in stdout
    art = read_artifact(out)
    validate_for_backbone(art, signature(bb))
    assert art.mode == "deep" and art.prompts.shape == (2, 2, 64) and art.name == "digits"
    assert art.labels == [f"digit{i}" for i in range(10)]
    s = art.train_summary
    assert s is not None and s["artifact_bytes"] == out.stat().st_size
    assert s["data"]["train_images"] + s["data"]["val_images"] == 80 and s["data"]["val_images"] == 10
    assert s["recipe"]["epochs"] == 2 and s["recipe"]["warmup_epochs"] == 0  # default: epochs // 10
    assert f"{s['artifact_bytes']:,}" in stdout


def test_train_csv_val_dir_grid(digit_folder, tmp_path, capsys):
    rows = ["path,label"] + [
        f"{p.relative_to(digit_folder)},{p.parent.name}" for p in sorted(digit_folder.rglob("*.png"))
    ]
    csv = digit_folder / "train.csv"  # relative paths resolve against the CSV's folder
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "grid.safetensors"
    args = [
        "train",
        "--backbone",
        SPEC,
        "--data",
        str(csv),
        "--val-dir",
        str(digit_folder),
        "--out",
        str(out),
    ]
    rc = main([*args, *FAST, "--mode", "shallow", "--lr-grid", "0.5", "2", "--wd-grid", "0"])
    assert rc == 0
    s = read_artifact(out).train_summary
    assert s is not None and s["mode"] == "shallow"
    assert [(g["base_lr"], g["weight_decay"]) for g in s["grid"]] == [(0.5, 0.0), (2.0, 0.0)]
    best = max(s["grid"], key=lambda g: (g["val_accuracy"], -g["val_loss"]))
    assert s["recipe"]["base_lr"] == best["base_lr"]
    assert s["val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-4)
    assert s["data"]["val_images"] == 80 and "grid (base lr, wd" in capsys.readouterr().out


def test_grid_flag_without_values_means_the_papers_grid():
    args = build_parser().parse_args(["train", "--backbone", "x", "--data", "d", "--out", "o", "--lr-grid"])
    assert args.lr_grid == [] and args.wd_grid is None


def test_train_errors_are_one_line(digit_folder, tmp_path, capsys):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a.png,1,extra\n")
    rc = main(["train", "--backbone", SPEC, "--data", str(bad_csv), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and "bad.csv:1: expected 'path,label'" in err

    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.png").write_bytes(b"not a png")
    rc = main(["train", "--backbone", SPEC, "--data", str(broken), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "x.png" in err and ("cannot decode" in err or "unrecognised image format" in err)

    other = tmp_path / "other"
    (other / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(other / "zebra" / "z.png")
    args = ["train", "--backbone", SPEC, "--data", str(digit_folder), "--val-dir", str(other)]
    rc = main([*args, "--out", str(tmp_path / "o"), *FAST])
    assert rc == 1 and "zebra" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    with pytest.raises(SystemExit) as e:  # usage errors: argparse's exit status 2
        main(["train", "--backbone", SPEC, "--data", str(digit_folder), "--out", "o", "--upload", "http://x"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------ upload
class _Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict]] = []  # each fixture makes a subclass with its own list
    reply: ClassVar[tuple[int, dict]] = (200, {})

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status, payload = type(self).reply
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_train_and_upload(digit_folder, tmp_path, capsys, server, monkeypatch):
    url, rec = server
    rec.reply = (200, {"task_id": "digits-1", "version": 1})
    monkeypatch.setenv("VPT_API_KEY", "secret-from-env")
    out = tmp_path / "t.safetensors"
    args = ["train", "--backbone", SPEC, "--data", str(digit_folder), "--out", str(out), *FAST]
    rc = main([*args, "--upload", url + "/", "--task", "digits-1"])
    assert rc == 0
    (req,) = rec.requests
    assert req["path"] == "/v1/tasks/digits-1"
    assert req["headers"]["Content-Type"] == "application/octet-stream"
    assert req["headers"]["Authorization"] == "Bearer secret-from-env"
    assert req["body"] == out.read_bytes()
    assert '"version": 1' in capsys.readouterr().out


def test_upload_error_reply_is_one_line_and_nonzero(tmp_path, capsys, server):
    """import-official shares the upload path (and needs no training, so it keeps this test fast)."""
    url, rec = server
    rec.reply = (409, {"error": {"type": "conflict", "message": "task digits-1 is pinned"}})
    f = tmp_path / "prompt_ep1.pth"
    torch.save({"shallow_prompt": np.zeros((1, 2, 64), dtype=np.float32)}, f)
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, head)
    args = ["import-official", str(f), "--backbone", SPEC, "--head", str(head), "--out", str(tmp_path / "t")]
    rc = main([*args, "--upload", url, "--task", "a b/c", "--api-key", "k1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == "vpt import-official: error: upload rejected: HTTP 409 conflict: task digits-1 is pinned"
    (req,) = rec.requests
    assert req["path"] == "/v1/tasks/a%20b%2Fc" and req["headers"]["Authorization"] == "Bearer k1"


def test_upload_unreachable_server(tmp_path, capsys):
    from clients.cli import CliError, upload_artifact

    with pytest.raises(CliError, match=re.escape("upload to http://127.0.0.1:9/v1/tasks/t failed")):
        upload_artifact("http://127.0.0.1:9", "t", b"x", None, timeout=2)
