"""Baseline (d) of the load benchmark: the endpoint a user would write by hand around `vpt`.

One forward pass per request, no batching, no queue: decode the image, build the model input, run the
task's prompts through `vpt`'s VisionTransformer (`PromptBatch.single_task`, as the official VPT code
broadcasts one task's prompts), apply the task's head, softmax, top-k. Same backbone, same tasks (read
from the same prompt store directory `vpt-serve` uses) and the same preprocessing function as the real
server, so the comparison isolates what the server adds: cross-task batching and its pipeline.

The route is a plain `def` (FastAPI runs it in its thread pool, the documented way to serve blocking
code), which lets decoding of one request overlap the forward of another. Only what the load benchmark
needs is here: classify with a raw image body, and /readyz.

    .venv/bin/python -m benchmarks.naive_server --backbone random:vit_test_small@0 --store DIR --port 8001
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from typing import Annotated

import torch
import uvicorn
from fastapi import Body, FastAPI, HTTPException

from prompt_store.artifact import BackboneSignature, load_artifact, validate_for_backbone
from prompt_store.base import NotFound
from prompt_store.local import LocalStore
from server.engine.engine import pick_device, pick_dtype
from vpt.hub import load_backbone
from vpt.prompts import PromptBatch
from vpt.transforms import ImageDecodeError, decode_image, eval_transform


@dataclass
class Task:
    prompts: torch.Tensor  # (L_p, P, D) in the model dtype, on the device
    deep: bool
    head_weight: torch.Tensor  # (C, D)
    head_bias: torch.Tensor  # (C,)
    labels: list[str]
    version: int


def create_app(backbone_spec: str, store_dir: str, device: str = "cpu", dtype: str = "auto") -> FastAPI:
    dev = pick_device(device)
    backbone = load_backbone(backbone_spec, device=dev, dtype=pick_dtype(dtype, dev))
    model, cfg = backbone.model, backbone.cfg
    store = LocalStore(store_dir, create=False)
    signature = BackboneSignature(cfg.embed_dim, cfg.depth, backbone.fingerprint, backbone.backbone_id)
    tasks: dict[str, Task] = {}  # loaded on first use and kept: what a hand-written server does
    lock = threading.Lock()
    app = FastAPI(title="naive VPT endpoint (benchmark baseline)")

    def get_task(task_id: str) -> Task:
        with lock:
            if task_id in tasks:
                return tasks[task_id]
        try:
            data, info = store.get("default", task_id)
        except NotFound:
            raise HTTPException(404, f"task {task_id!r} not found") from None
        art = load_artifact(data)
        validate_for_backbone(art, signature)
        p = model.pos_embed
        task = Task(
            prompts=art.prompts.to(p.device, p.dtype),
            deep=art.mode == "deep",
            head_weight=art.head_weight.to(p.device, p.dtype),
            head_bias=art.head_bias.to(p.device, p.dtype),
            labels=list(art.labels),
            version=info.version,
        )
        with lock:
            tasks[task_id] = task
        return task

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/tasks/{task_id}/classify")
    def classify(
        task_id: str, image: Annotated[bytes, Body(media_type="image/png")], top_k: int = 5
    ) -> dict[str, object]:
        task = get_task(task_id)
        try:
            pixels = eval_transform(decode_image(image), cfg)  # (3, S, S) uint8
        except ImageDecodeError as e:
            raise HTTPException(422, str(e)) from None
        with torch.inference_mode():
            x = model.normalize(pixels.unsqueeze(0).to(model.pos_embed.device))  # (1, 3, S, S)
            prompts = PromptBatch.single_task(task.prompts, 1, task.deep)
            feats = model.pool(model.forward_features(x, prompts))  # (1, D)
            logits = feats @ task.head_weight.T + task.head_bias  # (1, C)
            probs = logits.float().softmax(dim=-1)[0]
            scores, idx = probs.topk(min(top_k, probs.numel()))
        preds = [
            {"label": task.labels[i], "index": i, "score": s}
            for s, i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]
        return {"task_id": task_id, "version": task.version, "predictions": [preds]}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.naive_server", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--backbone", required=True)
    p.add_argument("--store", required=True, help="a LocalStore directory (tenant 'default')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    app = create_app(args.backbone, args.store, args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
