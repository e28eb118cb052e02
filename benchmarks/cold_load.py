"""Cold load of a task from the local store, per stage, in ms per MB of artifact.

The stages are exactly the server's path for a task that is not resident
(`server.scheduler.residency.Residency._fetch` then `Engine.install`):
`store.get` (manifest, file read, sha256 check) → `load_artifact` (header rules, safetensors, finiteness)
→ `validate_for_backbone` + `bank.check_fits` → `engine.install` (zeroing what the new task does not
overwrite, a deep task's per-layer keys/values derived through the backbone's LN1 and qkv weights,
copy with dtype conversion, device sync).
Files are read through the page cache (the store just wrote them): this is the cost of a task that is
on the server's disk but not in its bank, not of a disk seek. MB = 10^6 bytes.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import make_artifact, median, sync
from prompt_store.artifact import ArtifactLimits, load_artifact, save_artifact, validate_for_backbone
from prompt_store.artifact_rules import check_finite
from prompt_store.local import LocalStore
from server.engine.bank import TaskKey
from server.engine.engine import Engine
from vpt.hub import Backbone

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (mode, prompt length, classes, artifact dtype): ~1, ~2 and ~7 MB on ViT-B/16 (the paper's geometry).
DEFAULT_SIZES = [("deep", 50, 100, "bfloat16"), ("deep", 50, 100, "float32"), ("deep", 100, 1000, "float32")]


def measure_cold_load(
    backbone: Backbone,
    sizes: list[tuple[str, int, int, str]] = DEFAULT_SIZES,
    *,
    reps: int = 10,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    max_p = max(s[1] for s in sizes)
    max_c = max(s[2] for s in sizes)
    engine = Engine(backbone, bank_slots=4, max_prompt_length=max_p, max_classes=max_c, bank_bytes=None)
    limits = ArtifactLimits(max_bytes=256 * 1024 * 1024, max_prompt_length=max_p, max_classes=max_c)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = LocalStore(Path(tmp) / "store", limits=limits)
        for n, (mode, P, C, dt) in enumerate(sizes):
            task_id = f"cold-{n}"
            art = make_artifact(backbone, prompt_length=P, mode=mode, num_classes=C, seed=n, dtype=DTYPES[dt])
            store.put("default", task_id, save_artifact(art))
            stages: dict[str, list[float]] = {"get": [], "load_artifact": [], "validate": [], "install": []}
            # "Of which" parts, timed on their own right after: what dominates each stage.
            parts: dict[str, list[float]] = {
                "sha256": [],
                "finite_check": [],
                "derive_kv": [],
                "slot_copy": [],
            }
            size = 0
            for rep in range(reps + 1):  # the first rep warms allocator and code paths; not counted
                t0 = time.perf_counter()
                data, info = store.get("default", task_id)
                t1 = time.perf_counter()
                loaded = load_artifact(data, limits)
                t2 = time.perf_counter()
                validate_for_backbone(loaded, engine.signature)
                engine.bank.check_fits(loaded)
                t3 = time.perf_counter()
                # A new version each rep, so install really copies (an installed key returns early).
                engine.install(TaskKey("default", task_id, rep + 1), loaded)
                sync(engine.device)
                t4 = time.perf_counter()
                size = info.size
                slot = engine.bank.lookup(TaskKey("default", task_id, rep + 1))
                t5 = time.perf_counter()
                hashlib.sha256(data).hexdigest()
                t6 = time.perf_counter()
                for name, tensor in (
                    ("prompts", loaded.prompts),
                    ("head.weight", loaded.head_weight),
                    ("head.bias", loaded.head_bias),
                ):
                    check_finite(name, tensor)
                t7 = time.perf_counter()
                # A deep task's keys/values (issue J), then the copy into the slot (dtype conversion
                # included), again: what install costs besides bookkeeping. Same values, so the bank's
                # state is unchanged.
                bank, P_, C_ = engine.bank, loaded.prompt_length, loaded.num_classes
                with torch.no_grad():
                    prompts = loaded.prompts.to(engine.device)
                    kv = engine.model.prompt_kv(prompts) if mode == "deep" else None
                    sync(engine.device)
                    t8 = time.perf_counter()
                    if kv is not None:
                        bank.prompt_kv[slot, :, :P_].copy_(kv)
                    else:
                        bank.prompts[slot, :, :P_].copy_(prompts)
                    bank.head_weight[slot, :C_].copy_(loaded.head_weight)
                    bank.head_bias[slot, :C_].copy_(loaded.head_bias)
                sync(engine.device)
                t9 = time.perf_counter()
                if rep:
                    for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        stages[k].append(v)
                    for k, v in zip(parts, (t6 - t5, t7 - t6, t8 - t7, t9 - t8), strict=True):
                        parts[k].append(v)
            mb = size / 1e6
            row: dict[str, Any] = {"artifact": f"{mode} P={P} C={C} {dt}", "MB": mb}
            total = 0.0
            for k, v in stages.items():
                ms = median(v) * 1000
                row[f"{k}_ms"] = ms
                total += ms
            row["total_ms"] = total
            row["ms_per_MB"] = total / mb
            # Sum of each stage's fastest rep: the cost without interference from other jobs (on a busy
            # machine the median carries their noise).
            row["best_ms_per_MB"] = sum(min(v) for v in stages.values()) * 1000 / mb
            for k, v in parts.items():
                row[f"of_which_{k}_ms"] = median(v) * 1000
            row["bank_slot_MB"] = engine.bank.slot_bytes / 1e6
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.common import format_table, machine_info, write_json
    from vpt.hub import load_backbone

    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_base_patch16_224")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="benchmarks/results/cold_load.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure_cold_load(load_backbone(f"random:{args.preset}@0"), reps=args.reps)
    print(format_table(rows, list(rows[0]), f"cold load from the local store ({args.preset})"))
    write_json(
        args.json, {"benchmark": "cold_load", "machine": machine_info(), "preset": args.preset, "rows": rows}
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
