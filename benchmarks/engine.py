"""Engine benchmark: img/s of `server.engine.Engine` by batch size, prompt length and VPT mode, and
mixed-task batches vs batching per task under Zipf popularity (the Punica/S-LoRA idea applied to VPT).

What is timed is `Engine.run(EngineBatch)` — `Engine.submit` (the scheduler's call) and its result:
uint8 images on the host → normalise → per-sample prompt gather and insertion → ViT → per-sample head →
softmax → top-k on the host. No HTTP, no decoding, no queueing (benchmarks/load.py measures those).

Deep prompts (issue J): mode `deep` is the engine's path, prompts as per-layer keys/values; mode
`tokens` runs the same deep tasks with their prompts as full tokens through every block — the engine's
path before, kept here as the baseline of the same run (`TokenPath`). `vs_no_prompt` is each row's
img/s over the prompt-free row at the same batch size. The `modes` section times one batch mixing
shallow and deep tasks both ways the engine could run it: as two sub-batches (deep ones as keys/values;
what the engine does) and as one forward with every prompt as tokens, padded to the longest.

Mixed vs per task (ANCHORS.md: 10.3x on an H200 with ViT-B/16, deep P=50, 1000 tasks): one set of
`--zipf-requests` single-image requests drawn with Zipf(s) popularity over N tasks is run twice on the
same engine in the same process: (a) mixed — batches of up to `--zipf-batch` images in arrival order,
whatever their tasks; (b) per task — the same requests grouped by task, one batch per task (what a
server that can only broadcast one task's prompts must do). The ratio of the two is printed, and the
mixed results are checked against the per-task ones (the batch-invariance DESIGN.md promises).

    .venv/bin/python -m benchmarks.engine                              # CPU, small preset, ~1-2 min
    .venv/bin/python -m benchmarks.engine --device cuda --preset vit_base_patch16_224 --dtype bfloat16
    .venv/bin/python -m benchmarks.engine --quick                      # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    expected_distinct,
    format_table,
    int_list,
    machine_info,
    make_artifact,
    median,
    percentile,
    random_images,
    str_list,
    sync,
    timed_runs,
    write_json,
    zipf_sample,
)
from prompt_store.artifact import TaskArtifact
from server.engine.bank import TaskKey
from server.engine.batch import EngineBatch, EngineResult, batch_features, forward, split_modes
from server.engine.engine import Engine, pick_device, pick_dtype
from vpt.hub import Backbone, load_backbone
from vpt.prompts import PromptBatch, PromptKV

CPU_DEFAULTS = {
    "preset": "vit_test_small",
    "batch_sizes": "1,8,32,64,128",
    "prompt_lengths": "0,10,50",
    "tasks": 100,
    "latency_sizes": "1,8",
    "zipf_batch": 64,  # the server's default VPT_MAX_BATCH_SIZE; on CPU bigger batches only lose cache
}
GPU_DEFAULTS = {
    "preset": "vit_base_patch16_224",
    "batch_sizes": "1,8,32,128,256,512",
    "prompt_lengths": "0,10,50",
    "tasks": 1000,
    "latency_sizes": "1,8",
    "zipf_batch": 0,  # one mixed batch of all the requests, as in ANCHORS.md
}


# --- building -------------------------------------------------------------------------------------------
def build_engine(
    spec: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    bank_slots: int,
    max_prompt_length: int,
    max_classes: int,
    compile: bool = False,
    cuda_graph_max_batch: int = 0,
) -> tuple[Backbone, Engine]:
    backbone = load_backbone(spec, device=device, dtype=dtype)
    engine = Engine(
        backbone,
        bank_slots=bank_slots,
        max_prompt_length=max_prompt_length,
        max_classes=max_classes,
        compile=compile,
        cuda_graph_max_batch=cuda_graph_max_batch,
    )
    return backbone, engine


def install_tasks(
    engine: Engine,
    backbone: Backbone,
    *,
    n: int,
    prompt_length: int,
    mode: str,
    num_classes: int,
    tag: str,
    dtype: torch.dtype = torch.float32,
    tokens: TokenPath | None = None,
) -> list[int]:
    """Install n random tasks (evicting earlier ones LRU when the bank is full); returns their slots.
    `tokens`: also keep their prompts as tokens there."""
    slots = []
    for i in range(n):
        art = make_artifact(
            backbone, prompt_length=prompt_length, mode=mode, num_classes=num_classes, seed=i, dtype=dtype
        )
        slots.append(engine.install(TaskKey("bench", f"{tag}-{i}", 1), art))
        if tokens is not None:
            tokens.install(slots[-1], art)
    sync(engine.device)
    return slots


class TokenPath:
    """Every task's prompts as tokens through every block, deep ones replaced before each layer — the
    engine's forward before deep prompts became keys/values (issue J), for the same engine's tasks:
    `run` is `Engine.run` with only the feature forward swapped (same normalisation, heads, top-k)."""

    def __init__(self, engine: Engine) -> None:
        b = engine.bank
        self.engine = engine
        self.table = torch.zeros(
            b.capacity, b.depth, b.max_prompt_length, b.embed_dim, dtype=b.dtype, device=engine.device
        )  # (S, L, Pmax, D): shallow tasks fill layer 0
        self.features = engine._features  # compiled when the engine is

    def install(self, slot: int, art: TaskArtifact) -> None:
        self.table[slot].zero_()
        self.table[slot, : art.prompts.shape[0], : art.prompt_length].copy_(art.prompts)

    def _as_tokens(
        self,
        x: torch.Tensor,
        prompts: PromptBatch | None,
        between_blocks: Callable[[], None] | None = None,
        kv: PromptKV | None = None,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """`forward_features` with the deep samples' keys/values swapped for their prompt tokens."""
        if kv is None:
            return self.features(x, prompts, between_blocks, cls_only=cls_only)
        lengths = kv.lengths if prompts is None else kv.lengths + prompts.lengths  # one is 0 per sample
        P = kv.max_len if prompts is None else max(kv.max_len, prompts.max_len)
        uniform = kv.uniform and prompts is None
        tokens = PromptBatch(self.table, kv.index, lengths, kv.lengths > 0, P, uniform, True, False)
        return self.features(x, tokens, between_blocks, cls_only=cls_only)

    def batch_tokens(self, x: torch.Tensor, batch: EngineBatch) -> torch.Tensor:
        """(B, D) CLS features of normalised images, the whole batch in one token forward."""
        index = torch.tensor(batch.slots, dtype=torch.long)
        lengths = [i.prompt_length for i in batch.infos]
        prompts = PromptBatch.build(self.table, index, lengths, [i.deep for i in batch.infos])
        return self.engine.model.pool(self.features(x, prompts, cls_only=True))

    @torch.inference_mode()
    def run(self, batch: EngineBatch) -> EngineResult:
        e = self.engine
        t0 = time.perf_counter()
        cuda = e.device.type == "cuda"
        out = forward(e.model, self._as_tokens, e.bank, batch.images.to(e.device, non_blocking=cuda), batch)
        scores, indices = (t.cpu() for t in out)
        return EngineResult(scores, indices, None, time.perf_counter() - t0)


def make_batch(engine: Engine, images: torch.Tensor, slots: list[int], top_k: int = 5) -> EngineBatch:
    """What the scheduler hands the engine: host images (pinned on CUDA) + slot per sample."""
    if engine.device.type == "cuda":
        images = images.pin_memory()
    return EngineBatch(images, list(slots), [engine.bank.info(s) for s in slots], "classify", top_k)


# --- measurements ---------------------------------------------------------------------------------------
def throughput(
    engine: Engine,
    batch: EngineBatch,
    *,
    min_time: float,
    warmup: int = 2,
    run: Callable[[EngineBatch], EngineResult] | None = None,
) -> dict[str, float]:
    """Steady-state img/s of one batch run back to back (median batch time); `run`: instead of
    `engine.run`."""
    run = run or engine.run
    for _ in range(warmup):
        run(batch)
    cpu0 = time.process_time()
    times = timed_runs(lambda: run(batch), min_time=min_time)
    cpu = time.process_time() - cpu0
    B = len(batch.slots)
    t = median(times)
    # CPU ms per image (all threads of this process): the cost a server pays per image for the engine,
    # less sensitive than wall time to other jobs on a shared machine.
    return {"img_s": B / t, "ms_per_batch": t * 1000, "cpu_ms_per_img": cpu / (B * len(times)) * 1000,
            "runs": len(times)}  # fmt: skip


def mixed_batch(
    engine: Engine, slots: list[int], B: int, images: torch.Tensor, rng: random.Random
) -> EngineBatch:
    """B samples of tasks drawn uniformly from `slots` (each batch mixes up to B tasks)."""
    picks = [rng.choice(slots) for _ in range(B)]
    return make_batch(engine, images[:B], picks)


def zipf_compare(
    engine: Engine,
    slots: list[int],
    *,
    requests: int,
    s: float,
    max_batch: int,
    min_time: float,
    seed: int,
) -> dict[str, Any]:
    """Same requests, same engine: mixed batches vs one batch per task (Zipf(s) popularity)."""
    rng = random.Random(seed)
    tasks = zipf_sample(len(slots), s, requests, rng)  # task index per request, in arrival order
    images = random_images(requests, engine.cfg.img_size, seed)  # (R, 3, S, S)

    mixed = [(list(range(i, min(i + max_batch, requests))), None) for i in range(0, requests, max_batch)]
    groups: OrderedDict[int, list[int]] = OrderedDict()  # task → request rows, tasks in first-arrival order
    for row, t in enumerate(tasks):
        groups.setdefault(t, []).append(row)
    per_task = [
        (rows[i : i + max_batch], t) for t, rows in groups.items() for i in range(0, len(rows), max_batch)
    ]

    def plan(chunks: list[tuple[list[int], int | None]]) -> list[tuple[list[int], EngineBatch]]:
        idx = [
            (rows, make_batch(engine, images[rows], [slots[tasks[r]] for r in rows])) for rows, _ in chunks
        ]
        return idx

    mixed_plan, per_task_plan = plan(mixed), plan(per_task)

    def run_all(p: list[tuple[list[int], EngineBatch]]) -> list[tuple[list[int], EngineResult]]:
        return [(rows, engine.run(b)) for rows, b in p]

    # Warm both shapes, then alternate the two so drift on a shared machine hits both alike.
    run_all(mixed_plan)
    run_all(per_task_plan)
    t_mixed: list[float] = []
    t_per_task: list[float] = []
    start = time.perf_counter()
    while len(t_mixed) < 3 or time.perf_counter() - start < min_time:
        t_mixed += timed_runs(lambda: run_all(mixed_plan), min_time=0, min_runs=1)
        t_per_task += timed_runs(lambda: run_all(per_task_plan), min_time=0, min_runs=1)

    # Batch invariance: each request's scores are the same whichever batch it rode in.
    got_m, got_p = torch.zeros(requests, 5), torch.zeros(requests, 5)
    for rows, res in run_all(mixed_plan):
        assert res.scores is not None
        got_m[rows, : res.scores.shape[1]] = res.scores.float()
    for rows, res in run_all(per_task_plan):
        assert res.scores is not None
        got_p[rows, : res.scores.shape[1]] = res.scores.float()
    sizes = [len(rows) for rows, _ in per_task]
    tm, tp = median(t_mixed), median(t_per_task)
    return {
        "tasks": len(slots),
        "zipf_s": s,
        "requests": requests,
        "max_batch": max_batch,
        "distinct_tasks": len(groups),
        "expected_distinct_tasks": round(expected_distinct(len(slots), s, requests), 1),
        "mixed_batches": len(mixed),
        "per_task_batches": len(per_task),
        "per_task_batch_sizes": {
            "max": max(sizes),
            "median": median(sizes),
            "singletons": sum(1 for x in sizes if x == 1),
        },
        "mixed_img_s": requests / tm,
        "per_task_img_s": requests / tp,
        "ratio": tp / tm,
        "runs": len(t_mixed),
        "max_abs_score_diff": float((got_m - got_p).abs().max()),
    }


def deep_ratios(
    engine: Engine,
    backbone: Backbone,
    tokens: TokenPath,
    *,
    tasks: int,
    prompt_lengths: list[int],
    classes: int,
    batch_size: int,
    images: torch.Tensor,
    min_time: float,
) -> list[dict[str, Any]]:
    """Issue J's ratios at one batch size, interleaved: batches of deep tasks (uniform over `tasks` of
    them per P) as keys/values and as tokens, and of prompt-free tasks, each run in turn for a short
    slice until every one has `min_time`, so drift on a shared machine hits all alike (the sweep runs
    one configuration after another, and a single slow point skews its ratios)."""
    rng = random.Random(3)
    install = functools.partial(install_tasks, engine, backbone, n=tasks, num_classes=classes)
    plain = install(prompt_length=0, mode="shallow", tag="ratio0")
    runs: dict[tuple[str, int], tuple[Callable[[EngineBatch], EngineResult], EngineBatch]] = {
        ("none", 0): (engine.run, mixed_batch(engine, plain, batch_size, images, rng))
    }
    for P in prompt_lengths:
        slots = install(prompt_length=P, mode="deep", tag=f"ratio{P}", tokens=tokens)
        batch = mixed_batch(engine, slots, batch_size, images, rng)
        runs[("deep", P)] = (engine.run, batch)
        runs[("tokens", P)] = (tokens.run, batch)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    for run, batch in runs.values():
        run(batch)  # warm
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < 5 or time.perf_counter() - start < min_time * len(runs):
        for k, (run, batch) in runs.items():
            times[k] += timed_runs(lambda r=run, b=batch: r(b), min_time=0.05)  # type: ignore[misc]
    base = median(times[("none", 0)])
    return [
        {"mode": mode, "P": P, "batch": batch_size, "img_s": batch_size / median(t), "vs_no_prompt": base / median(t),
         "runs": len(t)}
        for (mode, P), t in times.items()
    ]  # fmt: skip


def modes_compare(
    engine: Engine,
    backbone: Backbone,
    tokens: TokenPath,
    *,
    tasks: int,
    prompt_length: int,
    classes: int,
    batch_sizes: list[int],
    images: torch.Tensor,
    min_time: float,
) -> list[dict[str, Any]]:
    """Batches alternating shallow and deep tasks (P each, `tasks` of each mode), CLS features three
    ways: two sub-batches (deep ones as keys/values), one forward (shallow prompts as tokens, deep ones
    as keys/values, each masked where a sample has none), and one forward with every prompt as tokens
    (the engine before issue J). Alternated, so drift hits all three; `engine` is what the engine
    chooses (`split_modes`)."""
    install = functools.partial(
        install_tasks,
        engine,
        backbone,
        n=tasks,
        prompt_length=prompt_length,
        num_classes=classes,
        tokens=tokens,
    )
    shallow = install(mode="shallow", tag="mix-s")
    deep = install(mode="deep", tag="mix-d")
    rng = random.Random(2)
    rows = []
    for B in batch_sizes:
        if B >= 2:
            picks = [rng.choice(deep if j % 2 else shallow) for j in range(B)]
            rows.append(
                _modes_row(engine, tokens, make_batch(engine, images[:B], picks), prompt_length, min_time)
            )
    return rows


@torch.inference_mode()
def _modes_row(
    engine: Engine, tokens: TokenPath, batch: EngineBatch, prompt_length: int, min_time: float
) -> dict[str, Any]:
    B = len(batch.slots)
    x = engine.model.normalize(batch.images.to(engine.device))
    index = torch.tensor(batch.slots, dtype=torch.long).to(engine.device)

    def way(split: bool | None) -> Callable[[], torch.Tensor]:
        def f() -> torch.Tensor:
            if split is None:
                out = tokens.batch_tokens(x, batch)
            else:
                out = batch_features(
                    engine.model, engine._features, engine.bank, x, batch, index, split=split
                )
            sync(engine.device)
            return out

        return f

    ways = {"split": way(True), "one_forward": way(False), "tokens": way(None)}
    outs = {k: f().float() for k, f in ways.items()}
    ref = outs["tokens"]
    diff = max(((o - ref).norm(dim=1) / ref.norm(dim=1)).max().item() for o in outs.values())
    times: dict[str, list[float]] = {k: [] for k in ways}
    start = time.perf_counter()
    while len(times["split"]) < 3 or time.perf_counter() - start < min_time:
        for k, f in ways.items():
            times[k] += timed_runs(f, min_time=0, min_runs=1)
    row: dict[str, Any] = {"batch": B, "P": prompt_length}
    row.update({f"{k}_img_s": B / median(t) for k, t in times.items()})
    row["split_over_one"] = row["split_img_s"] / row["one_forward_img_s"]
    deep = [i.deep for i in batch.infos]
    row["engine"] = "split" if split_modes(deep, [prompt_length] * B, engine.device) else "one_forward"
    row["max_rel_diff"] = diff
    return row


def latency(engine: Engine, slots: list[int], sizes: list[int], *, min_time: float) -> list[dict[str, Any]]:
    """Engine-side latency of small batches (host images in → top-k on the host)."""
    rng = random.Random(1)
    images = random_images(max(sizes), engine.cfg.img_size, 1)
    rows = []
    for B in sizes:
        batch = mixed_batch(engine, slots, B, images, rng)
        for _ in range(3):
            engine.run(batch)
        times = timed_runs(lambda b=batch: engine.run(b), min_time=min_time, min_runs=10)
        rows.append(
            {
                "batch": B,
                "p50_ms": percentile(times, 50) * 1000,
                "p99_ms": percentile(times, 99) * 1000,
                "runs": len(times),
            }
        )
    return rows


# --- main -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--preset", help="random-weight backbone preset (vpt/config.py); default by device")
    p.add_argument("--backbone", help="full backbone spec instead of --preset (e.g. a checkpoint path)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (Engine(compile=True))")
    p.add_argument(
        "--cuda-graphs",
        type=int,
        default=0,
        metavar="N",
        help="CUDA: replay batches of up to N as CUDA graphs (Engine(cuda_graph_max_batch=N))",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--batch-sizes", help="comma list; default by device")
    p.add_argument("--prompt-lengths", help="comma list (0 = no prompts: plain ViT + head)")
    p.add_argument(
        "--modes",
        default="shallow,deep,tokens",
        help="sweep modes; tokens: deep prompts as full tokens (before J)",
    )
    p.add_argument("--tasks", type=int, help="tasks in the bank (sweep and Zipf); default by device")
    p.add_argument("--classes", type=int, default=100, help="classes per task head")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--zipf-requests", type=int, default=256)
    p.add_argument("--zipf-batch", type=int, default=0,
                   help="max batch, both ways (default: 64 on CPU, all requests in one batch on GPU)")  # fmt: skip
    p.add_argument("--zipf-mode", default="deep")
    p.add_argument("--zipf-prompt-length", type=int, default=50)
    p.add_argument("--latency-sizes", help="batch sizes for the latency table; default 1,8")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measured point (at least)")
    p.add_argument(
        "--skip", default="", help="comma list of sections to skip: sweep,ratios,modes,zipf,latency"
    )
    p.add_argument("--json", default="benchmarks/results/engine.json", help="where to write the results")
    p.add_argument("--quick", action="store_true", help="smoke sizes: seconds, not minutes")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    if args.quick:
        d = {"preset": "vit_test_tiny", "batch_sizes": "1,8", "prompt_lengths": "0,4", "tasks": 8,
             "latency_sizes": "1", "zipf_batch": 0}  # fmt: skip
        args.min_time = min(args.min_time, 0.05)
        args.zipf_requests = min(args.zipf_requests, 32)
        args.zipf_prompt_length = min(args.zipf_prompt_length, 4)
        args.classes = min(args.classes, 10)
    args.preset = args.preset or d["preset"]
    args.batch_sizes = int_list(args.batch_sizes or d["batch_sizes"])
    args.prompt_lengths = int_list(args.prompt_lengths or d["prompt_lengths"])
    args.latency_sizes = int_list(args.latency_sizes or d["latency_sizes"])
    args.tasks = args.tasks or d["tasks"]
    args.modes = str_list(args.modes)
    args.skip = set(str_list(args.skip))
    args.zipf_batch = args.zipf_batch or d["zipf_batch"] or args.zipf_requests
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    spec = args.backbone or f"random:{args.preset}@0"
    max_p = max([*args.prompt_lengths, args.zipf_prompt_length, 1])
    t0 = time.perf_counter()
    backbone, engine = build_engine(
        spec,
        device=device,
        dtype=dtype,
        # The ratios section keeps `tasks` resident per prompt length (and prompt-free) at once.
        bank_slots=args.tasks * (1 + sum(1 for P in args.prompt_lengths if P > 0)),
        max_prompt_length=max_p,
        max_classes=args.classes,
        compile=args.compile,
        cuda_graph_max_batch=args.cuda_graphs,
    )
    engine.warmup((1, min(8, max(args.batch_sizes))))
    cfg = backbone.cfg
    print(
        f"# engine benchmark: {spec} (D={cfg.embed_dim}, depth {cfg.depth}, {cfg.img_size}px, "
        f"{cfg.num_patches} patches) on {device} {str(dtype).removeprefix('torch.')}"
        f"{' compiled' if args.compile else ''}{' CUDA graphs' if engine.graphs else ''}, torch threads {torch.get_num_threads()}, "
        f"load avg {machine_info()['loadavg_1m']:.1f} (set up in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    out: dict[str, Any] = {
        "benchmark": "engine",
        "machine": machine_info(device),
        "cuda_graphs": engine.graphs is not None,  # captured (and checked) at warm-up
        "config": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
        "backbone": {"spec": spec, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "img_size": cfg.img_size,
                     "num_patches": cfg.num_patches, "dtype": str(dtype).removeprefix("torch.")},
    }  # fmt: skip
    rng = random.Random(0)
    images = random_images(max([*args.batch_sizes, *args.latency_sizes]), cfg.img_size, 0)
    token_path = TokenPath(engine)

    if "sweep" not in args.skip:
        rows: list[dict[str, Any]] = []
        plain: dict[int, float] = {}
        combos = [(m, P) for P in args.prompt_lengths for m in (["none"] if P == 0 else args.modes)]
        for mode, P in combos:
            slots = install_tasks(
                engine,
                backbone,
                n=args.tasks,
                prompt_length=P,
                mode={"none": "shallow", "tokens": "deep"}.get(mode, mode),
                num_classes=args.classes,
                tag=f"{mode}{P}",
                tokens=token_path if mode == "tokens" else None,
            )
            for B in args.batch_sizes:
                batch = mixed_batch(engine, slots, B, images, rng)
                run = token_path.run if mode == "tokens" else engine.run
                r = throughput(engine, batch, min_time=args.min_time, run=run)
                if P == 0:
                    plain[B] = r["img_s"]
                row = {"mode": mode, "P": P, "batch": B, **r}
                row["vs_no_prompt"] = r["img_s"] / plain[B] if B in plain else float("nan")
                if mode == "tokens":  # the same numbers both ways (issue J's exactness, in this run)
                    kv, tok = engine.run(batch).scores, token_path.run(batch).scores
                    assert kv is not None and tok is not None
                    row["max_abs_score_diff_vs_deep"] = float((kv.float() - tok.float()).abs().max())
                rows.append(row)
                print(f"  {mode:>7} P={P:<3} B={B:<4} {r['img_s']:10.1f} img/s", flush=True)
        out["sweep"] = rows
        print(
            format_table(
                rows,
                ["mode", "P", "batch", "img_s", "ms_per_batch", "vs_no_prompt"],
                f"img/s, mixed batches over {args.tasks} tasks (tasks drawn uniformly per sample); "
                "tokens = deep prompts as full tokens (the engine before issue J)",
            )
        )
        by = {(r["mode"], r["P"], r["batch"]): r for r in rows}
        for (mode, P, B), r in by.items():
            t = by.get(("tokens", P, B))
            if mode == "deep" and t is not None:
                print(
                    f"  deep P={P} B={B}: {r['vs_no_prompt']:.2f}x the prompt-free img/s as keys/values, "
                    f"{t['vs_no_prompt']:.2f}x as tokens ({r['img_s'] / t['img_s']:.2f}x faster; max |score "
                    f"diff| {t['max_abs_score_diff_vs_deep']:.1e})"
                )

    if "ratios" not in args.skip:
        ratios = deep_ratios(
            engine,
            backbone,
            token_path,
            tasks=args.tasks,
            prompt_lengths=[P for P in args.prompt_lengths if P > 0],
            classes=args.classes,
            batch_size=min(args.zipf_batch, max(args.batch_sizes)),  # CPU 64, GPU 256 by default
            images=images,
            min_time=max(args.min_time * 2, 0.1),
        )
        out["deep_ratios"] = ratios
        print(
            format_table(
                ratios,
                ["mode", "P", "batch", "img_s", "vs_no_prompt", "runs"],
                "deep prompts vs no prompts, interleaved (issue J's targets): keys/values (deep) and tokens",
            )
        )

    if "modes" not in args.skip:
        modes = modes_compare(
            engine,
            backbone,
            token_path,
            tasks=max(args.tasks // 2, 1),
            prompt_length=args.zipf_prompt_length,
            classes=args.classes,
            batch_sizes=args.batch_sizes,
            images=random_images(max(args.batch_sizes), cfg.img_size, 2),
            min_time=max(args.min_time, 0.1),
        )
        out["modes"] = modes
        print(
            format_table(
                modes,
                [
                    "batch",
                    "P",
                    "split_img_s",
                    "one_forward_img_s",
                    "tokens_img_s",
                    "split_over_one",
                    "engine",
                ],
                "shallow + deep tasks alternating in one batch: two sub-batches (deep as keys/values), one "
                "forward (tokens + keys/values, masked), one forward all tokens (before issue J)",
            )
        )

    slots: list[int] = []
    if {"zipf", "latency"} - args.skip:
        slots = install_tasks(
            engine,
            backbone,
            n=args.tasks,
            prompt_length=args.zipf_prompt_length,
            mode=args.zipf_mode,
            num_classes=args.classes,
            tag="zipf",
        )
    if "zipf" not in args.skip:
        z = zipf_compare(
            engine,
            slots,
            requests=args.zipf_requests,
            s=args.zipf_s,
            max_batch=args.zipf_batch,
            min_time=max(args.min_time * 4, 0.1),
            seed=0,
        )
        out["zipf"] = z
        print(
            format_table(
                [
                    {"batching": "mixed", "batches": z["mixed_batches"], "img_s": z["mixed_img_s"]},
                    {"batching": "per task", "batches": z["per_task_batches"], "img_s": z["per_task_img_s"]},
                ],
                ["batching", "batches", "img_s"],
                f"Zipf({z['zipf_s']}) over {z['tasks']} tasks, {z['requests']} requests "
                f"({z['distinct_tasks']} distinct tasks), {args.zipf_mode} P={args.zipf_prompt_length}, "
                f"max batch {z['max_batch']}",
            )
        )
        print(
            f"\nmixed / per-task = {z['ratio']:.2f}x  (max |score diff| mixed vs per-task "
            f"{z['max_abs_score_diff']:.1e})"
        )
    if "latency" not in args.skip:
        lat = latency(engine, slots, args.latency_sizes, min_time=args.min_time)
        out["latency"] = lat
        print(
            format_table(
                lat,
                ["batch", "p50_ms", "p99_ms", "runs"],
                f"engine latency ({args.zipf_mode} P={args.zipf_prompt_length})",
            )
        )
    write_json(args.json, out)
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
