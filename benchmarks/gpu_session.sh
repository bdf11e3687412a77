#!/usr/bin/env bash
# Everything a GPU session checks, in one call (device tool: results come back from $OUT):
#   1. the CUDA tests (pytest -m cuda),
#   2. the speed benchmark on CUDA (benchmarks/results/speed-cuda.json),
#   3. as much of the full-width CIFAR-10 table as fits (seed 0, 30 epochs, 11 runs side by side),
# then a short table of what it measured. Outputs: at most 8 files under $OUT, no checkpoints.
#
#   cp ../shared/data/cifar10-jpeg.zip .device-data/     # .device-data/ is git-ignored
#   run: bash benchmarks/gpu_session.sh                     (carry: [".device-data"])
#
# Try it on the CPU first (small and quick):  DEVICE=cpu QUICK=1 EPOCHS=1 SEEDS=0 \
#   ONLY="fp32 int4-stochastic-tensor" OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src
OUT=${OUT:-/tmp/gpu-session}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.device-data/cifar10-jpeg.zip}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-0}
PARALLEL=${PARALLEL:-11}
TABLE_SECONDS=${TABLE_SECONDS:-330}   # the table stops here; killed runs keep their epochs
QUICK=${QUICK:-}
ONLY=${ONLY:-}
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

log "machine: $(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")')"

log "1. cuda tests"
python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider > "$OUT/cuda-tests.txt" 2>&1
log "   $(tail -n 1 "$OUT/cuda-tests.txt")"

log "2. speed benchmark ($DEVICE)"
python3 -m benchmarks.speed --device "$DEVICE" --data "$DATA" ${QUICK:+--quick} \
    --out "$OUT/speed-$DEVICE.json" > "$OUT/speed.log" 2>&1
log "   $(tail -n 1 "$OUT/speed.log")"

log "3. table: seeds $SEEDS, $EPOCHS epochs, $PARALLEL at once, for at most ${TABLE_SECONDS}s"
RUNS="$OUT/runs"
timeout --signal=INT "$TABLE_SECONDS" python3 -m metagrad reproduce --profile paper \
    --epochs "$EPOCHS" --seeds $SEEDS --parallel "$PARALLEL" --data "$DATA" \
    --runs-dir "$RUNS" ${ONLY:+--only $ONLY} > "$OUT/table.log" 2>&1
pkill -INT -f "metagrad train" 2>/dev/null; sleep 3
python3 -m metagrad reproduce --profile paper --epochs "$EPOCHS" --runs-dir "$RUNS" \
    --report-only >> "$OUT/table.log" 2>&1
# results, report, curves, and each run's summary, metrics and log: never checkpoints
tar czf "$OUT/table.tar.gz" -C "$OUT" --exclude='*.pt' --exclude='.*.pt.*' runs
cp "$RUNS/results.json" "$RUNS/report.md" "$OUT/" 2>/dev/null
rm -rf "$RUNS"

log "summary"
python3 - "$OUT" "$DEVICE" <<'PY' | tee -a "$OUT/session.log"
import json, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
speed = json.loads((out / f"speed-{device}.json").read_text()) if (out / f"speed-{device}.json").is_file() else {}
for name, row in speed.get("steps", {}).items():
    ratio = f"{row['ratio']:.3f}x {row['compared_with']}" if "ratio" in row else ""
    print(f"step {name:38s} {row['seconds'] * 1e3:8.2f} ms  {row['x_bf16']:.3f}x bf16  {ratio}")
for key in ("quantizer", "memory"):
    if key in speed:
        print(key, json.dumps(speed[key]))
if "layers" in speed:
    print("conv medians", json.dumps(speed["layers"]["conv_medians"]))
results = out / "results.json"
if results.is_file():
    for r in json.loads(results.read_text())["runs"]:
        print(f"{r['run']:34s} epochs {r['epochs_completed']:3d}/{r['epochs']}  "
              f"final {r['final_test_acc']}  step {r['mean_step_seconds']}")
PY
ls -la "$OUT"
