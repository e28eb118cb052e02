#!/usr/bin/env bash
# GPU check (issue H, point 4): the GPU tests and benchmarks in one go, under 10 minutes, one summary table.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine: ViT-B/16 bf16, 1000 tasks, deep P=50
#   bash benchmarks/gpu_check.sh --smoke    # tiny CPU sizes (also what runs when CUDA is absent)
#
# Steps (each under its own `timeout`; the budgets sum to 540 s, which leaves a 10-minute device call
# room for set-up, --kill-after and the summary):
#   1. pytest -m gpu                        GPU tests (CUDA graphs vs eager, GPU JPEG decode vs Pillow,
#                                            training with bf16 autocast, vpt-serve on CUDA with graphs)
#   2. engine, eager                         img/s by batch (mixed, 1000 tasks), Zipf mixed vs per task,
#                                            batch-1/8 latency
#   2b. engine, CUDA graphs                  batch-1/2/4/8 latency with graphs (--cuda-graphs 8)
#   3. engine, torch.compile                 same backbone compiled: batch 256/512
#   4. load, JPEG uploads                    open-loop HTTP sweep against vpt-serve (mixed) and the naive
#                                            endpoint, 1 JPEG per request; then mixed with 8 per request
#                                            (multipart) so the Python load generator is not the limit;
#                                            1024 px JPEGs decoded by Pillow vs nvJPEG (VPT_GPU_DECODE=1)
#   4b. load, API servers (issue I)         the 1-JPEG sweep again with VPT_API_SERVERS=1 and =0 (one
#                                            process, the layout before issue I) next to step 4's default
#                                            (half the CPUs, up to 8); each sweep starts at 50 req/s, the
#                                            light-load p50. Their 90 s come on top of the 540: give them a
#                                            call of their own (STEPS="load_jpeg load_jpeg_n1 load_jpeg_n0")
#   5. perf_analyzer                         Triton's perf_analyzer on the /v2 routes (Open Inference
#                                            Protocol) of a vpt-serve that benchmarks/triton_load.py
#                                            starts: 256 px JPEGs, 1 and 8 per request, concurrency 1/4/16.
#                                            Only where perf_analyzer is installed (Triton's SDK image);
#                                            elsewhere skipped with a line saying so. Its 60 s come on top
#                                            of the 540: where it runs, give it a call of its own
#                                            (STEPS=perf_analyzer) if the first ran short
# Results: $OUT_DIR (default benchmarks/results/gpu) — JSON per step, logs, summary.md.
# Extra engine flags for the eager and compiled steps: ENGINE_EXTRA="--flag ...".
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT_DIR:-benchmarks/results/gpu}
ENGINE_EXTRA=${ENGINE_EXTRA:-}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    [ "$SMOKE" = 1 ] || echo "no CUDA device: running the CPU smoke path instead" >&2
    SMOKE=1
fi
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
T0=$(date +%s)

# STEPS="name ..." (space-separated) runs only the steps named, e.g. to rerun what failed within a
# device lease; a name that is no step is refused before anything runs.
ALL_STEPS="pytest_gpu engine_eager engine_graphs engine_compile load_jpeg load_jpeg_n1 load_jpeg_n0 load_multi load_decode_pillow load_decode_nvjpeg perf_analyzer"
for s in ${STEPS:-}; do
    [[ " $ALL_STEPS " == *" $s "* ]] || { echo "STEPS: no step named '$s' (steps: $ALL_STEPS)" >&2; exit 2; }
done

# step NAME BUDGET_S CMD...: run with a time limit, log to $OUT/NAME.log, record status and seconds.
selected() {  # is step $1 in STEPS (all steps when STEPS is unset)?
    [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]
}

step() {
    local name=$1 budget=$2 start rc
    shift 2
    if ! selected "$name"; then
        printf '%s\tskipped (STEPS)\t0\n' "$name" >> "$OUT/steps.tsv"
        return
    fi
    rm -f "$OUT/$name.json"  # a failed rerun must not show an earlier run's figures
    start=$(date +%s)
    echo "== $name (budget ${budget}s): $*" >&2
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local status=ok
    [ $rc -eq 0 ] || status="fail rc=$rc"
    [ $rc -eq 124 ] && status="timeout"
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
    [ $rc -eq 0 ] || tail -n 20 "$OUT/$name.log" >&2
}

if [ "$SMOKE" = 1 ]; then
    DEV=(--device cpu --threads 1)
    ENGINE_SIZES=(--quick)
    COMPILE_SIZES=()
    LOAD=(--quick --configs mixed,naive --image-format jpeg)
    LOAD_N=(--quick --configs mixed --image-format jpeg --cold-preset none)
    LOAD_MULTI=(--quick --configs mixed --image-format jpeg --images-per-request 4 --rates 10 --cold-preset none)
    TRITON=(--device cpu --duration 1 --concurrency 1,4 --images-per-request 1,8 --images 4 --v1 off)
else
    DEV=(--device cuda --preset vit_base_patch16_224 --dtype bfloat16)
    ENGINE_SIZES=(--tasks 1000 --modes deep --prompt-lengths 0,50 --batch-sizes 1,8,32,128,256,512
                  --zipf-mode deep --zipf-prompt-length 50 --zipf-requests 256 --latency-sizes 1,8
                  --min-time 0.5)
    # No latency section: each batch size would compile anew (step 2b measures small-batch latency).
    # Deep P=50 as keys/values; the eager step's `ratios` section has the token path (before issue J).
    COMPILE_SIZES=(--tasks 1000 --modes deep --prompt-lengths 50 --batch-sizes 256,512
                   --skip ratios,modes,zipf,latency --zipf-prompt-length 50 --min-time 0.5)
    GRAPH_SIZES=(--tasks 1000 --modes deep --prompt-lengths 50 --batch-sizes 8 --skip sweep,ratios,modes,zipf
                 --zipf-prompt-length 50 --latency-sizes 1,2,4,8 --min-time 0.5 --cuda-graphs 8)
    # 200 tasks (bf16 artifacts, ~1 MB each) keep the uploads to seconds; the engine steps use 1000.
    LOAD_COMMON=(--device cuda --preset vit_base_patch16_224 --image-format jpeg --image-px 256
                 --mode deep --prompt-length 50 --classes 100 --max-batch 256
                 --duration 4 --timeout 5 --max-outstanding 1024 --stop-after-saturated 1)
    LOAD=("${LOAD_COMMON[@]}" --tasks 200 --configs mixed,naive --rates 50,1000,3000,6000)
    LOAD_N=("${LOAD_COMMON[@]}" --tasks 200 --configs mixed --rates 50,1000,3000,6000 --cold-preset none)
    LOAD_MULTI=("${LOAD_COMMON[@]}" --tasks 100 --configs mixed --images-per-request 8 --rates 600,1200
                --cold-preset none)
    # Pillow vs nvJPEG (VPT_GPU_DECODE) on 1024 px JPEGs, large enough for the GPU path (>= 2x 256), at
    # the default number of API servers (they hand the JPEGs' bytes to the core, which decodes them).
    LOAD_DECODE=("${LOAD_COMMON[@]}" --image-px 1024 --tasks 50 --configs mixed --images-per-request 8
                 --rates 400,800,1600 --cold-preset none)
    # perf_analyzer: 6 points of up to 3 windows of 2 s each (any spread counts as stable: it reports,
    # not gates), after the server's start (~15 s).
    TRITON=(--device cuda --preset vit_base_patch16_224 --image-px 256 --duration 2
            --concurrency 1,4,16 --images-per-request 1,8 --v1 off)
fi

# 1. GPU tests (only if the suite declares a `gpu` marker).
if "$PY" -m pytest --markers 2>/dev/null | grep -q '^@pytest.mark.gpu'; then
    if [ "$SMOKE" = 1 ]; then
        printf 'pytest_gpu\tskipped (no CUDA)\t0\n' >> "$OUT/steps.tsv"
    else
        # Only the files that hold `gpu` tests: collecting the whole suite would import test-only
        # packages (moto, playwright, ...) a bare GPU image lacks.
        mapfile -t GPU_FILES < <(grep -rl --include='*.py' 'pytest.mark.gpu' tests)
        step pytest_gpu 80 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_FILES[@]}"
    fi
else
    printf 'pytest_gpu\tskipped (no gpu marker)\t0\n' >> "$OUT/steps.tsv"
fi

# 2-3. Engine, eager then compiled.
# shellcheck disable=SC2086
step engine_eager 90 "$PY" -m benchmarks.engine "${DEV[@]}" "${ENGINE_SIZES[@]}" $ENGINE_EXTRA \
    --json "$OUT/engine_eager.json"
if [ "$SMOKE" = 1 ]; then
    printf 'engine_graphs\tskipped (smoke)\t0\n' >> "$OUT/steps.tsv"
    printf 'engine_compile\tskipped (smoke)\t0\n' >> "$OUT/steps.tsv"
else
    step engine_graphs 30 "$PY" -m benchmarks.engine "${DEV[@]}" "${GRAPH_SIZES[@]}" --json "$OUT/engine_graphs.json"
    # shellcheck disable=SC2086
    step engine_compile 100 "$PY" -m benchmarks.engine "${DEV[@]}" "${COMPILE_SIZES[@]}" --compile $ENGINE_EXTRA \
        --json "$OUT/engine_compile.json"
fi

# 4. HTTP load with JPEG uploads.
step load_jpeg 90 "$PY" -m benchmarks.load "${LOAD[@]}" --json "$OUT/load_jpeg.json" --plot "$OUT/load_jpeg.png"
step load_multi 50 "$PY" -m benchmarks.load "${LOAD_MULTI[@]}" --json "$OUT/load_multi.json" --plot none
# 4b. The same with one API server, and with none (one process: the layout before issue I).
step load_jpeg_n1 45 "$PY" -m benchmarks.load "${LOAD_N[@]}" --server-env VPT_API_SERVERS=1 \
    --json "$OUT/load_jpeg_n1.json" --plot none
step load_jpeg_n0 45 "$PY" -m benchmarks.load "${LOAD_N[@]}" --server-env VPT_API_SERVERS=0 \
    --json "$OUT/load_jpeg_n0.json" --plot none
if [ "$SMOKE" = 1 ]; then
    printf 'load_decode_pillow\tskipped (smoke)\t0\nload_decode_nvjpeg\tskipped (smoke)\t0\n' >> "$OUT/steps.tsv"
else
    step load_decode_pillow 50 "$PY" -m benchmarks.load "${LOAD_DECODE[@]}" \
        --json "$OUT/load_decode_pillow.json" --plot none
    step load_decode_nvjpeg 50 "$PY" -m benchmarks.load "${LOAD_DECODE[@]}" --server-env VPT_GPU_DECODE=1 \
        --json "$OUT/load_decode_nvjpeg.json" --plot none
fi

# 5. Triton's perf_analyzer against the server triton_load.py starts; it reads /v2/models/<task>/config.
if ! selected perf_analyzer || command -v perf_analyzer > /dev/null 2>&1; then
    step perf_analyzer 60 "$PY" -m benchmarks.triton_load "${TRITON[@]}" --perf-analyzer \
        --json "$OUT/perf_analyzer.json"
else
    echo "== perf_analyzer: skipped, not installed on this machine (it comes with Triton's SDK image)" >&2
    printf 'perf_analyzer\tskipped (perf_analyzer not installed)\t0\n' >> "$OUT/steps.tsv"
fi

# Summary table (markdown) from whatever JSON the steps produced.
"$PY" - "$OUT" "$(( $(date +%s) - T0 ))" <<'PYEOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out, wall = Path(sys.argv[1]), sys.argv[2]


def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


rows = []


def add(measure, value, target=""):
    rows.append((measure, value, target))


eager, graphs, comp, load_j, load_m, dec_p, dec_n = (
    load(n)
    for n in (
        "engine_eager", "engine_graphs", "engine_compile", "load_jpeg", "load_multi",
        "load_decode_pillow", "load_decode_nvjpeg",
    )
)
machine = next((d["machine"] for d in (eager, graphs, comp, load_j, load_m, dec_p, dec_n) if d), {})
for tag, d in (("eager", eager), ("CUDA graphs", graphs), ("compile", comp)):
    if not d:
        continue
    if tag == "CUDA graphs" and not d.get("cuda_graphs"):
        add("engine CUDA graphs", "not captured: see engine_graphs.log")
    for r in d.get("sweep", []):
        if r["P"] > 0 and r["batch"] in (256, 512):
            add(f"engine {tag} {r['mode']} P={r['P']} batch {r['batch']}", f"{r['img_s']:,.0f} img/s",
                ">= 11,000 img/s" if r["batch"] == 256 else "")
        if r["P"] == 0 and r["batch"] == 256:
            add(f"engine {tag} no prompts batch 256", f"{r['img_s']:,.0f} img/s")
    for r in d.get("deep_ratios", []):  # issue J: deep P as keys/values and as tokens vs no prompts
        if r["P"] > 0:
            add(f"engine {tag} deep P={r['P']} {'as tokens (before J)' if r['mode'] == 'tokens' else 'as keys/values'}"
                f" batch {r['batch']}", f"{r['img_s']:,.0f} img/s ({r['vs_no_prompt']:.2f}x no prompts)",
                ">= 9,500 img/s" if r["mode"] == "deep" and r["P"] == 50 else "")
    for r in d.get("modes", []):
        if r["batch"] == 256:
            add(f"engine {tag} shallow+deep batch 256: two sub-batches / one forward / all tokens",
                f"{r['split_img_s']:,.0f} / {r['one_forward_img_s']:,.0f} / {r['tokens_img_s']:,.0f} img/s")
    z = d.get("zipf")
    if z:
        add(f"engine {tag} Zipf({z['zipf_s']}) {z['tasks']} tasks, {z['requests']} req: mixed vs per task",
            f"{z['mixed_img_s']:,.0f} vs {z['per_task_img_s']:,.0f} img/s ({z['ratio']:.1f}x)")
    for r in d.get("latency", []):
        add(f"engine {tag} latency batch {r['batch']} (p50 / p99)", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms",
            ("<= 1.1 ms" if tag == "CUDA graphs" else "<= 1.5 ms") if r["batch"] == 1 else "")
load_n1, load_n0 = load("load_jpeg_n1"), load("load_jpeg_n0")
for d, how in (
    (load_j, ", default API servers"), (load_n1, ", 1 API server"), (load_n0, ", one process"),
    (load_m, ""), (dec_p, ", Pillow"), (dec_n, ", nvJPEG"),
):  # fmt: skip
    if not d:
        continue
    c = d["config"]
    px = f"{c['image_px']}px " if c.get("image_px") else ""
    tag = f"{c['images_per_request']} {px}{c['image_format'].upper()}/request, {c['tasks']} tasks{how}"
    s = d["summary"]
    one_jpeg = c["images_per_request"] == 1 and c.get("image_px") == 256
    for cfg, v in s.get("peak_img_s", {}).items():
        add(f"HTTP {cfg}, {tag}: peak", f"{v:,.0f} img/s", ">= 5,000" if one_jpeg and cfg == "mixed" else "")
    light = s.get("light_load_p50_ms", {}).get("mixed")
    if light and light["offered_rps"] <= 100:
        add(f"HTTP mixed, {tag}: p50 at {light['offered_rps']:g} req/s", f"{light['p50_ms']:.2f} ms",
            "<= 3 ms" if one_jpeg else "")
    if "http_vs_raw_engine" in s:
        add(f"HTTP mixed / raw engine at batch {s['raw_engine_img_s_at_batch']['batch']} ({tag})",
            f"{s['http_vs_raw_engine']:.2f}", ">= 0.85")
    if "mixed_vs_naive" in s:
        add(f"HTTP mixed / naive ({tag})", f"{s['mixed_vs_naive']:.1f}x")
    if "cold_load_ms_per_MB_max" in s:
        add("cold load from local store, worst artifact", f"{s['cold_load_ms_per_MB_max']:.2f} ms/MB", "<= 2 ms/MB")
for r in (load("perf_analyzer") or {}).get("points", []):
    add(f"perf_analyzer /v2, {r['images_per_request']} JPEG/request, concurrency {r['concurrency']} (p50 / p99)",
        f"{r['img_s']:,.0f} img/s ({r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms)")
print(f"## GPU check — {machine.get('gpu', 'no GPU (CPU smoke)')}, torch {machine.get('torch', '?')}, "
      f"{machine.get('when', '')}, {wall}s\n")
print("| step | status | s |\n|---|---|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    print("| " + " | ".join(line.split("\t")) + " |")
print("\n| measure | value | target |\n|---|---|---|")
for m, v, t in rows:
    print(f"| {m} | {v} | {t} |")
PYEOF
# Non-zero when any step failed, so a CI job or a person notices.
! grep -qP '\t(fail|timeout)' "$OUT/steps.tsv"
