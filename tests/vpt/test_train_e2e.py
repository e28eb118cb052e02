"""End to end (issue E, point 5): `vpt train --upload` into a real `vpt-serve` process; the server's
predictions on held-out images equal the trainer's own evaluation of them.

The trainer evaluates with `eval_transform` and the `PromptBatch`/`HeadBatch` forward; the server decodes
the same PNG bytes and runs the same functions inside a batched engine, so top-1 must agree on every image
and the scores to float tolerance.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clients.cli import main
from prompt_store.artifact import read_artifact
from tests.server.server_proc import ServerProcess
from vpt.hub import load_backbone
from vpt.train.data import EvalImages, load_labelled_images
from vpt.train.loop import RunOptions, evaluate
from vpt.train.recipe import TaskParams

pytestmark = pytest.mark.integration

SPEC = "random:vit_test_tiny@0"


def write_digits(root: Path, per_class: int, offset: int) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    seen: dict[int, int] = {}
    for img, t in zip(d.images, d.target, strict=True):
        t = int(t)
        seen[t] = seen.get(t, 0) + 1
        if offset < seen[t] <= offset + per_class:
            (root / f"d{t}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(root / f"d{t}" / f"{seen[t]}.png")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("srv"), backbone=SPEC).wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_uploaded_task_predicts_like_the_trainer(server, tmp_path, capsys):
    train_dir, held_dir = tmp_path / "train", tmp_path / "heldout"
    write_digits(train_dir, per_class=10, offset=0)
    write_digits(held_dir, per_class=3, offset=10)  # images the trainer never trained on
    out = tmp_path / "digits.safetensors"
    args = [
        "train",
        "--backbone",
        SPEC,
        "--data",
        str(train_dir),
        "--val-dir",
        str(held_dir),
        "--out",
        str(out),
    ]
    args += ["--epochs", "3", "--batch-size", "16", "--prompt-length", "3", "-q"]
    assert main([*args, "--upload", server.url, "--task", "digits"]) == 0
    assert '"task_id": "digits"' in capsys.readouterr().out  # the server's reply, printed
    art = read_artifact(out)
    assert art.train_summary is not None

    # The trainer's evaluation of the held-out images, recomputed from the uploaded bytes; it must equal
    # what the trainer reported (the CLI's --val-dir run).
    bb = load_backbone(SPEC)
    held = load_labelled_images(held_dir, bb.cfg, classes=art.labels)
    params = TaskParams.from_tensors(art.prompts, art.head_weight, art.head_bias, deep=art.mode == "deep")
    views = EvalImages(held, bb.cfg)
    ev = evaluate(params, bb.model, views, RunOptions(progress=False))
    assert ev.accuracy == pytest.approx(art.train_summary["val_accuracy"], abs=1e-4)
    with torch.no_grad():
        x = torch.stack([views[i][0] for i in range(len(views))])
        probs = params.logits(bb.model, x).softmax(-1)

    # load_labelled_images lists sorted class folders, then sorted files: the order of `paths`.
    paths = sorted(held_dir.rglob("*.png"))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(f"{server.url}/v1/tasks/digits/classify?top_k=1", files=files, timeout=60)
    assert r.status_code == 200, r.text
    preds = [pred[0] for pred in r.json()["predictions"]]
    assert [p["index"] for p in preds] == ev.predictions
    assert [p["label"] for p in preds] == [art.labels[i] for i in ev.predictions]
    expected = probs.max(-1).values.tolist()
    assert [p["score"] for p in preds] == pytest.approx(expected, abs=1e-5)
