#!/usr/bin/env bash
# The GPU benchmark suite, one prepared run: every registered model at 224 px, bf16 and fp32,
# JAX against PyTorch eager and torch.compile (training step and inference), and the input
# pipeline's cost for lightnetcell and resnet18 (jaxcell bench --pipeline), on one GPU, inside
# a time budget of about 9 minutes (BUDGET_S=540). Needs no network. See docs/benchmarks.md.
#
#     bench/gpu.sh OUTDIR            # writes OUTDIR/results.json, OUTDIR/summary.md, OUTDIR/log.txt
#     QUICK=1 bench/gpu.sh OUTDIR    # or --quick: a tiny model on the CPU in seconds (checks the script)
#
# Work runs in order of importance, one process per model and pass: bf16 jax+torch, fp32
# jax+torch, the bf16 input-pipeline pass (PIPELINE_MODELS, one device), then torch.compile
# bf16 and fp32. Each process gets the shared deadline; a runner
# that would start after it is recorded as skipped, a failing one with its error (out of memory,
# a compiler missing), and the suite goes on. PYTHON picks the interpreter (default: the
# checkout's .venv if it has jax and torch, else python3); the checkout is put on PYTHONPATH.
set -u -o pipefail

OUT=${1:?usage: bench/gpu.sh OUTDIR [--quick]}
QUICK=${QUICK:-0}
[ "${2:-}" = "--quick" ] && QUICK=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import jax, torch" 2>/dev/null; then
    PYTHON=$ROOT/.venv/bin/python
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU, one after the other
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export PYTHONUNBUFFERED=1

mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/log.txt
: > "$LOG"

if [ "$QUICK" = 1 ]; then
  MODELS=${MODELS:-lightnetcell}
  SIZE=32; STEPS=2; WARMUP=1; BUDGET=${BUDGET_S:-120}; DEVICES=1,2
  EXTRA=(--model-arg "widths=(8,16,16)" --model-arg hidden=16)
  PASSES=("fp32,bf16 jax,torch" "fp32 pipeline")
  PIPELINE_MODELS=${PIPELINE_MODELS:-lightnetcell}
else
  MODELS=${MODELS:-$("$PYTHON" -c "import jaxcell.models as m; print(' '.join(m.names()))")}
  SIZE=224; STEPS=${STEPS:-10}; WARMUP=2; BUDGET=${BUDGET_S:-540}; DEVICES=1,2,4,8
  EXTRA=()
  PASSES=("bf16 jax,torch" "fp32 jax,torch" "bf16 pipeline" "bf16 torch-compile" "fp32 torch-compile")
  PIPELINE_MODELS=${PIPELINE_MODELS:-lightnetcell resnet18}
fi
DEADLINE=$(( $(date +%s) + BUDGET ))

batch_for() {  # per-device batch: 256 where the activations fit an 80 GB card comfortably
  if [ "$QUICK" = 1 ]; then echo 4; return; fi
  case "$1" in
    lightnetcell|resnet18|resnet34|resnet50) echo 256 ;;
    *) echo 128 ;;
  esac
}

for pass in "${PASSES[@]}"; do
  read -r precision frameworks <<< "$pass"
  models=$MODELS
  what=(--frameworks "$frameworks" --devices "$DEVICES")
  if [ "$frameworks" = pipeline ]; then  # the trainer's step fed by each input pipeline; JAX only
    models=$PIPELINE_MODELS
    what=(--pipeline --devices 1)
  fi
  for model in $models; do
    now=$(date +%s)
    if [ "$now" -ge "$DEADLINE" ]; then
      echo "skip $model $precision $frameworks: time budget spent" | tee -a "$LOG"
      continue
    fi
    json=$WORK/${model}_${precision//,/-}_${frameworks//,/-}.json
    echo "== $model $precision $frameworks (batch $(batch_for "$model"), $((DEADLINE - now)) s left)" | tee -a "$LOG"
    # The harness stops starting runners at the deadline; the timeout ends one that hangs.
    timeout --kill-after=10 $((DEADLINE - now + 60)) "$PYTHON" -m jaxcell.cli bench --model "$model" \
      --image-size "$SIZE" --batch-size "$(batch_for "$model")" --precision "$precision" \
      "${what[@]}" --steps "$STEPS" --warmup "$WARMUP" \
      --deadline "$DEADLINE" --json "$json" ${EXTRA[@]+"${EXTRA[@]}"} >> "$LOG" 2>&1 \
      || echo "   exit status $? ($model $precision $frameworks)" | tee -a "$LOG"
  done
done

"$PYTHON" - "$OUT" "$WORK" <<'EOF'
import glob, json, os, sys
from jaxcell import bench
out, work = sys.argv[1], sys.argv[2]
reports = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(work, "*.json")))]
merged = bench.merge(reports)
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(merged, f, indent=2)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(bench.summary_markdown(merged["results"]))
print(f"{len(merged['results'])} results from {len(reports)} runs -> {out}/results.json, {out}/summary.md")
EOF
