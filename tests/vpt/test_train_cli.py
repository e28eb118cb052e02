"""`vpt train` through `clients.cli.main`: ImageFolder / CSV in, validated artifact out, upload.

Every flag is checked to reach the `Recipe`, `RunOptions` or `train_from_paths` argument the command
builds (`clients.cli.train_arguments`). The upload tests answer from a real HTTP server on 127.0.0.1
(http.server in a thread) that records the request: method, path, headers and body are checked byte for
byte. The upload goes through the SDK as `vpt upload` does; that its exit statuses equal `vpt upload`'s
against a real `vpt-serve` is tested in tests/clients/test_cli.py, and the end-to-end check (predictions
equal the trainer's) in tests/vpt/test_train_e2e.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from clients.cli import EXIT_AUTH, EXIT_ERROR, build_parser, main, train_arguments
from prompt_store.artifact import read_artifact, validate_for_backbone
from server.api.schemas import TASK_EXAMPLE
from vpt.hub import load_backbone
from vpt.train import PAPER_LR_GRID, PAPER_WD_GRID, Recipe
from vpt.train.job import default_workers, resolve_device, signature
from vpt.train.loop import RunOptions

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


def parse_train(*flags: str) -> Any:
    return build_parser().parse_args(["train", "--backbone", SPEC, "--data", "d", "--out", "o", *flags])


def test_train_defaults_are_the_papers():
    kw = train_arguments(parse_train())
    assert kw["recipe"] == Recipe(epochs=100, warmup_epochs=10)  # warm-up: epochs // 10
    device = resolve_device("auto")
    assert kw["opts"] == RunOptions(
        device=device, workers=default_workers(device), save_dtype=torch.float32, progress=True
    )
    assert kw["val_split"] == 0.1 and kw["grid"] is None and kw["val_dir"] is None


def test_every_train_flag_reaches_the_recipe_options_or_job():
    """Each value differs from its default, so a flag the command dropped would fail here."""
    flags = {
        "--mode": "shallow",
        "--prompt-length": "3",
        "--epochs": "7",
        "--batch-size": "32",
        "--lr": "0.5",
        "--weight-decay": "0.003",
        "--warmup-epochs": "2",
        "--prompt-dropout": "0.25",
        "--val-split": "0.3",
        "--seed": "17",
        "--device": "cuda:1",  # a torch.device is made, nothing is allocated on it
        "--dtype": "bfloat16",
        "--workers": "3",
        "--img-size": "48",
        "--cache-mb": "5",
        "--name": "n",
        "--description": "about n",
    }
    kw = train_arguments(parse_train(*(x for kv in flags.items() for x in kv), "--quiet"))
    assert kw["recipe"] == Recipe(
        mode="shallow",
        prompt_length=3,
        epochs=7,
        batch_size=32,
        base_lr=0.5,
        weight_decay=0.003,
        warmup_epochs=2,
        prompt_dropout=0.25,
        seed=17,
    )
    assert kw["opts"] == RunOptions(
        device=torch.device("cuda", 1), workers=3, save_dtype=torch.bfloat16, progress=False
    )
    assert kw == {
        "backbone_spec": SPEC,
        "data": "d",
        "recipe": kw["recipe"],
        "opts": kw["opts"],
        "out": "o",
        "val_dir": None,
        "val_split": 0.3,
        "img_size": 48,
        "grid": None,
        "cache_bytes": 5 << 20,
        "name": "n",
        "description": "about n",
    }
    assert train_arguments(parse_train("--val-dir", "v"))["val_dir"] == "v"
    # Zero is a value, not "use the default".
    zeros = train_arguments(parse_train("--weight-decay", "0", "--warmup-epochs", "0", "--workers", "0"))
    assert zeros["recipe"].weight_decay == 0 and zeros["recipe"].warmup_epochs == 0
    assert zeros["opts"].workers == 0


def test_the_command_passes_what_train_arguments_builds(monkeypatch):
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_train_from_paths(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("vpt.train.job.train_from_paths", fake_train_from_paths)
    argv = ["--weight-decay", "0.02", "--seed", "5", "--device", "cpu", "--dtype", "float16", "--lr-grid"]
    with pytest.raises(Stop):
        main(["train", "--backbone", SPEC, "--data", "d", "--out", "o", *argv])
    assert seen.pop("on_grid_run") is not None  # not --quiet: grid runs are reported
    assert seen == train_arguments(parse_train(*argv))
    assert seen["recipe"].weight_decay == 0.02 and seen["opts"].save_dtype == torch.float16


def test_grid_flag_without_values_means_the_papers_grid():
    args = parse_train("--lr-grid")
    assert args.lr_grid == [] and args.wd_grid is None
    assert train_arguments(args)["grid"] == (list(PAPER_LR_GRID), list(PAPER_WD_GRID))
    assert train_arguments(parse_train("--wd-grid"))["grid"] == (list(PAPER_LR_GRID), list(PAPER_WD_GRID))
    assert train_arguments(parse_train("--wd-grid", "0"))["grid"] == (list(PAPER_LR_GRID), [0.0])
    assert train_arguments(parse_train("--lr-grid", "2", "0.5"))["grid"] == ([2.0, 0.5], list(PAPER_WD_GRID))
    with pytest.raises(SystemExit) as e:  # a grid needs validation data
        train_arguments(parse_train("--lr-grid", "--val-split", "0"))
    assert e.value.code == 2


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
def task_info(task_id: str) -> dict[str, Any]:
    """A `PUT /v1/tasks/ID` reply as the server sends it (its OpenAPI example, for this task)."""
    return {**TASK_EXAMPLE, "task_id": task_id}


class _Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict]] = []  # each fixture makes a subclass with its own list
    # (status, JSON, headers) per request, in order; the last one answers every later request
    replies: ClassVar[list[tuple[int, dict, dict[str, str]]]] = [(200, {}, {})]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        type(self).requests.append({"path": self.path, "headers": headers, "body": body})
        replies = type(self).replies
        status, payload, extra = replies.pop(0) if len(replies) > 1 else replies[0]
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
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
    rec.replies = [(200, task_info("digits-1"), {})]
    monkeypatch.setenv("VPT_API_KEY", "secret-from-env")
    out = tmp_path / "t.safetensors"
    args = ["train", "--backbone", SPEC, "--data", str(digit_folder), "--out", str(out), *FAST]
    rc = main([*args, "--upload", url + "/", "--task", "digits-1"])
    assert rc == 0
    (req,) = rec.requests
    assert req["path"] == "/v1/tasks/digits-1"
    assert req["headers"]["content-type"] == "application/octet-stream"
    assert req["headers"]["authorization"] == "Bearer secret-from-env"
    assert req["body"] == out.read_bytes()
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.index("{") :])  # the task info, as `vpt upload --json` prints it
    assert printed.items() >= task_info("digits-1").items()


@pytest.fixture
def official_prompts(tmp_path) -> list[str]:
    """`vpt import-official` arguments for a tiny prompt file + head (no training: fast)."""
    f = tmp_path / "prompt_ep1.pth"
    torch.save({"shallow_prompt": np.zeros((1, 2, 64), dtype=np.float32)}, f)
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, head)
    return ["import-official", str(f), "--backbone", SPEC, "--head", str(head), "--out", str(tmp_path / "t")]


def test_upload_error_reply_is_one_line_and_nonzero(capsys, server, official_prompts):
    """import-official shares the upload path (and needs no training, so it keeps this test fast)."""
    url, rec = server
    rec.replies = [(422, {"error": {"type": "invalid_artifact", "message": "labels: 3 != 4"}}, {})]
    rc = main([*official_prompts, "--upload", url, "--task", "a b/c", "--api-key", "k1"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR
    assert err == "vpt import-official: error: 422 invalid_artifact: labels: 3 != 4\n"
    (req,) = rec.requests  # a 4xx is not retried
    assert req["path"] == "/v1/tasks/a%20b%2Fc" and req["headers"]["authorization"] == "Bearer k1"

    rec.requests.clear()
    rec.replies = [(401, {"error": {"type": "unauthorized", "message": "invalid API key"}}, {})]
    rc = main([*official_prompts, "--upload", url, "--task", "t", "--api-key", "k1"])
    assert rc == EXIT_AUTH
    err = capsys.readouterr().err  # the CLI says which key the server refused
    assert err == "vpt import-official: error: 401 unauthorized: invalid API key (from --api-key)\n"


def test_upload_without_a_url_goes_to_the_configured_server(capsys, server, official_prompts, monkeypatch):
    """`--upload` alone: $VPT_URL, or --url (before or after the command), as for every other command."""
    url, rec = server
    rec.replies = [(200, task_info("t"), {})]
    monkeypatch.setenv("VPT_URL", url)
    assert main([*official_prompts, "--upload", "--task", "t"]) == 0
    monkeypatch.setenv("VPT_URL", "http://127.0.0.1:1")  # not asked: --url comes first
    assert main(["--url", url, *official_prompts, "--upload", "--task", "t"]) == 0
    assert main([*official_prompts, "--task", "t", "--url", url, "--upload"]) == 0
    assert [r["path"] for r in rec.requests] == ["/v1/tasks/t"] * 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a value after --upload is its URL: a file name is refused
        main([*official_prompts, "--upload", "t.safetensors", "--task", "t"])
    assert e.value.code == 2 and "--upload 't.safetensors': not a server URL" in capsys.readouterr().err
    assert len(rec.requests) == 3


def test_upload_retries_a_busy_server_like_vpt_upload(capsys, server, official_prompts):
    url, rec = server
    busy = {"error": {"type": "overloaded", "message": "queue full"}}
    down = {"error": {"type": "unavailable", "message": "draining"}}
    rec.replies = [
        (429, busy, {"Retry-After": "0"}),
        (503, down, {"Retry-After": "0"}),
        (200, task_info("t"), {}),
    ]
    assert main([*official_prompts, "--upload", url, "--task", "t"]) == 0
    assert len(rec.requests) == 3 and rec.requests[0]["body"] == rec.requests[2]["body"]
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["task_id"] == "t"
