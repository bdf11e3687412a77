#!/usr/bin/env bash
# Everything a GPU session checks, in one call that fits the device's limits (one command at
# most 10 minutes; BUDGET, default 500 s, bounds the whole script). Whoever is lent a GPU runs
# this first. Steps, in order, each in its own process group, stopped at its limit (SIGINT to
# that group, then SIGKILL after GRACE seconds) and logged; a step that fails or is stopped
# does not stop the others, and a step that no longer fits the budget is skipped:
#   tests    the CUDA tests (pytest -m cuda: tests/test_fp8.py, then tests/test_cuda.py)
#   matrix   benchmarks.step_matrix: training steps of bf16, every gradient preset, the int8
#            and fp8 backends and MetaGrad, on VGG-16, ViT-Tiny and the character GPT; the fp8
#            backend's Linear backward against bf16 and against its emulation
#   speed    benchmarks.speed --parts steps layers: VGG-16 steps (fp32, TF32, bf16, INT4, int8
#            backend, MetaGrad) and each layer's backward (int8 routes)
#   compile  benchmarks.compile_step: eager against torch.compile(model), transformers
#   table    metagrad reproduce: the full-width CIFAR-10 table (EPOCHS epochs, PARALLEL runs at
#            once) with whatever time is left, then its report from the epochs completed
# Outputs under $OUT (3 files, never checkpoints): session.log (this log and the summary),
# summary.txt (the summary alone) and results.tar.gz (every step's log and JSON, the table's
# results.json, report.md and each run's summary and metrics), packed again after each step.
#
#   cp ../shared/data/cifar10-jpeg.zip .device-data/     # .device-data/ is git-ignored
#   run: bash benchmarks/gpu_session.sh       (carry: [".device-data"], timeout_s: BUDGET + 40)
#
# Try it on the CPU first (quick runs; within BUDGET, most steps stopped at their caps there):
#   DEVICE=cpu QUICK=1 BUDGET=300 PROFILE=cpu EPOCHS=1 ONLY=fp32 PARALLEL=1 OUT=/tmp/gpu-out \
#     DATA=/work/shared/data/cifar10-jpeg.zip PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
#
# Settings (environment): OUT, DEVICE (cuda), BUDGET (500 s), STEPS (which of the steps above,
# in order), QUICK (smoke runs), DATA (CIFAR-10 zip), PROFILE (paper), EPOCHS (30), SEEDS (0),
# PARALLEL (11), ONLY (table settings), PYTHON (python3), GRACE (10 s), RESERVE (20 s kept for
# the summary), and each step's cap in seconds: CAP_TESTS, CAP_MATRIX, CAP_SPEED, CAP_COMPILE.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-session}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-500}
STEPS=${STEPS:-tests matrix speed compile table}
QUICK=${QUICK:-}
DATA=${DATA:-.device-data/cifar10-jpeg.zip}
[[ -e $DATA ]] || DATA=../shared/data/cifar10-jpeg.zip
PROFILE=${PROFILE:-paper}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-0}
PARALLEL=${PARALLEL:-11}
ONLY=${ONLY:-}
GRACE=${GRACE:-10}
RESERVE=${RESERVE:-20}
MIN_STEP=${MIN_STEP:-20}
CAP_TESTS=${CAP_TESTS:-120}
CAP_MATRIX=${CAP_MATRIX:-150}
CAP_SPEED=${CAP_SPEED:-100}
CAP_COMPILE=${CAP_COMPILE:-60}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")
mkdir -p "$OUT" "$WORK/logs"
: > "$OUT/session.log"
CURRENT=""
DOG=""

set -m # every background job gets its own process group: a step is stopped with its children

log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }
left() { echo $((BUDGET - SECONDS)); }

pack() { # every log and JSON of the session, never a checkpoint
    (cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \
        -o -name '*.md' -o -name '*.txt' \) -print0 | tar czf "$OUT/results.tar.gz" --null -T -)
}

stop_group() { # PGID: SIGINT to the group this script started, SIGKILL after GRACE seconds
    kill -INT -- "-$1" 2>/dev/null || return 0
    for _ in $(seq "$GRACE"); do
        kill -0 -- "-$1" 2>/dev/null || return 0
        sleep 1
    done
    kill -KILL -- "-$1" 2>/dev/null
    return 0
}

on_signal() {
    log "interrupted: stopping ${CURRENT:-nothing}"
    [[ -n $DOG ]] && kill -- "-$DOG" 2>/dev/null
    [[ -n $CURRENT ]] && stop_group "$CURRENT"
    pack
    rm -rf "$WORK"
    exit 130
}
trap on_signal INT TERM

run_step() { # NAME CAP CMD...: CMD for at most min(CAP, budget left - RESERVE) seconds
    local name=$1 cap=$2
    shift 2
    local limit=$(($(left) - RESERVE))
    ((cap < limit)) && limit=$cap
    if ((limit < MIN_STEP)); then
        log "$name: skipped (${limit}s of the budget left for it)"
        echo "$name: skipped" >> "$WORK/steps.txt"
        return
    fi
    log "$name: at most ${limit}s: $*"
    local start=$SECONDS
    "$@" > "$WORK/logs/$name.log" 2>&1 &
    local pid=$!
    CURRENT=$pid
    (sleep "$limit" && touch "$WORK/logs/$name.stopped" && stop_group "$pid") > /dev/null 2>&1 &
    DOG=$!
    wait "$pid"
    local rc=$?
    kill -- "-$DOG" 2>/dev/null
    wait "$DOG" 2>/dev/null
    kill -KILL -- "-$pid" 2>/dev/null # anything of the step's group still running
    CURRENT=""
    DOG=""
    local how="failed (exit $rc)"
    ((rc == 0)) && how="ok"
    [[ -e $WORK/logs/$name.stopped ]] && how="stopped at its limit of ${limit}s (exit $rc)"
    log "$name: $how after $((SECONDS - start))s; last line: $(tail -n 1 "$WORK/logs/$name.log" | cut -c1-150)"
    echo "$name: $how, $((SECONDS - start))s" >> "$WORK/steps.txt"
    pack
}

log "machine: $($PY -c 'import torch, platform
d = torch.cuda.get_device_name() + " (capability %d.%d)" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "no cuda"
print("torch", torch.__version__, "|", d, "|", platform.processor() or platform.machine())' 2>&1 | tail -n 1)"
log "device $DEVICE, budget ${BUDGET}s, steps: $STEPS${QUICK:+ (quick)}; data $DATA; work dir $WORK"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader >> "$WORK/logs/nvidia-smi.txt" 2>&1

for step in $STEPS; do
    case $step in
        tests)
            run_step tests "$CAP_TESTS" $PY -m pytest -rs -m cuda -p no:cacheprovider \
                tests/test_fp8.py tests/test_cuda.py
            ;;
        matrix)
            run_step matrix "$CAP_MATRIX" $PY -m benchmarks.step_matrix --device "$DEVICE" \
                --data "$DATA" ${QUICK:+--quick} --out "$WORK/step-matrix-$DEVICE.json"
            ;;
        speed)
            run_step speed "$CAP_SPEED" $PY -m benchmarks.speed --device "$DEVICE" --data "$DATA" \
                --parts steps layers ${QUICK:+--quick} --out "$WORK/speed-$DEVICE.json"
            ;;
        compile)
            run_step compile "$CAP_COMPILE" $PY -m benchmarks.compile_step --device "$DEVICE" \
                --data "$DATA" --grads bf16 int4-stochastic ${QUICK:+--quick --width 0.25} \
                --out "$WORK/compile-step-$DEVICE.json"
            ;;
        table)
            run_step table $((BUDGET * 2)) $PY -m metagrad reproduce --profile "$PROFILE" \
                --epochs "$EPOCHS" --seeds $SEEDS --parallel "$PARALLEL" --data "$DATA" \
                --runs-dir "$WORK/table" ${ONLY:+--only $ONLY}
            if [[ -d $WORK/table ]]; then # the report of the epochs completed
                $PY -m metagrad reproduce --profile "$PROFILE" --epochs "$EPOCHS" \
                    --runs-dir "$WORK/table" --report-only > "$WORK/logs/table-report.log" 2>&1 ||
                    log "table report: failed (see logs/table-report.log)"
            fi
            ;;
        *) log "unknown step $step (tests, matrix, speed, compile, table)" ;;
    esac
done

log "summary"
$PY - "$WORK" "$DEVICE" << 'PY' 2>&1 | tee "$OUT/summary.txt" | tee -a "$OUT/session.log"
import json, sys
from pathlib import Path

work, device = Path(sys.argv[1]), sys.argv[2]


def read(name):
    path = work / name
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


print((work / "steps.txt").read_text().strip() if (work / "steps.txt").is_file() else "no steps")
def lines(name, *starts):
    path = work / "logs" / name
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return [line for line in text if line.startswith(starts)]


tests = lines("tests.log", "")
if tests:
    print("cuda tests:", tests[-1])
    for line in lines("tests.log", "FAILED", "ERROR", "SKIPPED"):
        if not line.startswith("SKIPPED") or "test_fp8" in line:
            print(f"  {line}")
matrix = read(f"step-matrix-{device}.json")
for row in matrix.get("layers", []):
    print(f"fp8 layer {row['name']:22s} {row['ms']}  bf16/fp8 {row['bf16/fp8']}x  "
          f"emulated/fp8 {row['emulated/fp8']}x")
for model in ("vgg16", "vit_tiny", "gpt_char"):
    if model not in matrix:
        continue
    routes = matrix[model]["fp8_routes"]
    print(f"{model}: fp8 backend runs {routes['fp8']} of {routes['layers']} layers as FP8 GEMMs")
    for name, row in matrix[model]["steps"].items():
        if "seconds" not in row:
            print(f"  {name:16s} failed: {row['error']}")
            continue
        ratio = f"  {row['ratio']:.3f}x {row['compared_with']}" if "ratio" in row else ""
        print(f"  {name:16s} {row['seconds'] * 1e3:9.2f} ms  {row.get('x_bf16', 0):.3f}x bf16{ratio}")
speed = read(f"speed-{device}.json")
for name, row in speed.get("steps", {}).items():
    ratio = f"  {row['ratio']:.3f}x {row['compared_with']}" if "ratio" in row else ""
    print(f"vgg16 step {name:36s} {row['seconds'] * 1e3:9.2f} ms  {row['x_bf16']:.3f}x bf16{ratio}")
if "layers" in speed:
    print("vgg16 conv medians", json.dumps(speed["layers"]["conv_medians"]))
for line in [] if speed else lines("speed.log", "step ", "vgg16.", "mlp.", "conv medians"):
    print(line)  # stopped before writing its JSON: the rows it printed
compiled = read(f"compile-step-{device}.json")
for model in ("vit_tiny", "gpt_char"):
    for name, row in compiled.get(model, {}).items():
        if isinstance(row, dict) and "seconds" in row:
            print(f"compile {model} {name:28s} {row['seconds'] * 1e3:9.2f} ms")
results = read("table/results.json")
for r in results.get("runs", []):
    print(f"table {r['run']:34s} epochs {r['epochs_completed']}/{r['epochs']}  "
          f"final {r['final_test_acc']}")
for run in sorted(p for p in (work / "table").glob("*") if p.is_dir()):
    metrics = run / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    last = records[-1].get("test_acc") if records else None
    print(f"table run {run.name:30s} {len(records)} epochs completed, last test acc {last}")
PY
pack
rm -rf "$WORK"
ls -la "$OUT"
