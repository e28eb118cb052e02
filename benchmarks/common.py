"""Helpers shared by the benchmarks: task popularity, synthetic tasks, timing, tables, machine facts.

Popularity follows a Zipf law, p(k) ∝ k^-s over tasks ranked k = 1..N (s = 1.1 in ANCHORS.md): a few hot
tasks and a long tail, the traffic shape under which batching per task stops working.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from prompt_store.artifact import TaskArtifact
from vpt.hub import Backbone

REPO = Path(__file__).resolve().parents[1]


# --- traffic ------------------------------------------------------------------------------------------
def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf probabilities of ranks 1..n."""
    w = [k**-s for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def zipf_sample(n: int, s: float, count: int, rng: random.Random) -> list[int]:
    """`count` task indices in [0, n) drawn i.i.d. with Zipf(s) popularity (index 0 is the hottest)."""
    return rng.choices(range(n), weights=zipf_weights(n, s), k=count)


def expected_distinct(n: int, s: float, count: int) -> float:
    """Expected number of distinct tasks among `count` Zipf draws (= batches when batching per task)."""
    return sum(1 - (1 - p) ** count for p in zipf_weights(n, s))


# --- synthetic tasks ------------------------------------------------------------------------------------
def make_artifact(
    backbone: Backbone,
    *,
    prompt_length: int,
    mode: str,
    num_classes: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> TaskArtifact:
    """A random task that fits `backbone` (prompts at VPT's init scale, so activations stay sane)."""
    cfg = backbone.cfg
    g = torch.Generator().manual_seed(seed)
    layers = cfg.depth if mode == "deep" else 1
    bound = cfg.prompt_init_bound
    prompts = (torch.rand(layers, prompt_length, cfg.embed_dim, generator=g) * 2 - 1) * bound
    return TaskArtifact(
        prompts=prompts.to(dtype),  # (L_p, P, D)
        head_weight=(torch.randn(num_classes, cfg.embed_dim, generator=g) * 0.05).to(dtype),  # (C, D)
        head_bias=torch.zeros(num_classes, dtype=dtype),  # (C,)
        mode=mode,  # type: ignore[arg-type]
        backbone=backbone.backbone_id,
        backbone_fingerprint=backbone.fingerprint,
        labels=[f"class{i}" for i in range(num_classes)],
    )


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, size, size) noise images: the engine's input after decoding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# --- timing -----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(
    fn: Callable[[], object], *, min_time: float, min_runs: int = 3, max_runs: int = 10_000
) -> list[float]:
    """Wall seconds of repeated `fn()` calls: at least `min_runs`, and at least `min_time` in total."""
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < max_runs and (len(out) < min_runs or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """q in [0, 100], linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- output -----------------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Markdown table (renders in a terminal and pastes into docs as it is)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return "-" if v is None else str(v)

    lines = [] if title is None else [f"\n### {title}\n"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a number was measured on: CPU, cores, load, library versions, GPU name, commit."""
    info: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return (
            out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
        )
    except (OSError, subprocess.SubprocessError):
        return None
