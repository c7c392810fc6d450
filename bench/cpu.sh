#!/usr/bin/env bash
# The CPU table of docs/benchmarks.md: every registered model at 64 px, batch 32, training step
# and inference, JAX (and its before-the-fixes baseline, and its step with XLA's own convolutions
# instead of oneDNN's) against PyTorch eager, interleaved step by
# step in one process per model; torch.compile too for the models in COMPILE (its C++ builds take
# minutes each on 2 cores). Writes OUTDIR/cpu64_<model>.json and prints the table.
#
#     bench/cpu.sh [OUTDIR]        # default bench/results; SIZE, BATCH, STEPS, MODELS override
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/bench/results}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SIZE=${SIZE:-64}; BATCH=${BATCH:-32}; STEPS=${STEPS:-5}
COMPILE=${COMPILE:-"lightnetcell resnet18"}
MODELS=${MODELS:-$("$PYTHON" -c "import jaxcell.models as m; print(' '.join(m.names()))")}
mkdir -p "$OUT"
for model in $MODELS; do
  frameworks=jax,jax-eigen,jax-baseline,torch
  case " $COMPILE " in *" $model "*) frameworks=$frameworks,torch-compile ;; esac
  echo "== $model ($frameworks), load $(cut -d' ' -f1 /proc/loadavg)"
  "$PYTHON" -m jaxcell.cli bench --model "$model" --image-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" \
    --frameworks "$frameworks" --json "$OUT/cpu${SIZE}_$model.json" > /dev/null || echo "   failed: $model"
done
"$PYTHON" "$ROOT/bench/cpu_table.py" "$OUT"/cpu"${SIZE}"_*.json
