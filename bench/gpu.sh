#!/usr/bin/env bash
# The GPU benchmark suite, one prepared run: every registered model at 224 px, bf16 and fp32,
# JAX against PyTorch eager and torch.compile (training step and inference), and the input
# pipeline's cost for lightnetcell and resnet18 (jaxcell bench --pipeline), on one GPU, inside
# a time budget of about 9 minutes (BUDGET_S=540). Needs no network. See docs/benchmarks.md.
#
#     bench/gpu.sh OUTDIR                        # writes OUTDIR/results.json, summary.md, log.txt, runs/
#     bench/gpu.sh OUTDIR --quick --allow-cpu    # a tiny model on the CPU in seconds (checks the script)
#
# It refuses to run, naming the problem, unless JAX and torch both compute on a GPU (JAX falls
# back to the CPU silently); --allow-cpu measures on the CPU anyway.
#
# Work runs in order of importance, one process per model and pass: first JAX against
# torch.compile for resnet18 and resnet50 (bf16, one device); then bf16 jax+torch at the large
# per-device batch, and for resnet18/resnet50 at 32 (the per-device batch of the README's 8-GPU
# example); fp32 jax+torch; the bf16 input-pipeline pass (PIPELINE_MODELS, one device); then
# torch.compile bf16 and fp32 for the other models. Every process's timeout is the time left (a
# runner that would start after the deadline is recorded as skipped, a failing one with its
# error), each rewrites its JSON in OUTDIR/runs as every runner finishes, and results.json and
# summary.md are merged again after each process: a run cut short keeps what it measured.
# PYTHON picks the interpreter (default: the checkout's .venv if it has jax and torch, else
# python3); the checkout is put on PYTHONPATH.
set -u -o pipefail

OUT=${1:?usage: bench/gpu.sh OUTDIR [--quick] [--allow-cpu]}
shift
QUICK=${QUICK:-0}
ALLOW_CPU=${ALLOW_CPU:-0}
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    *) echo "bench/gpu.sh: unknown option $arg (use --quick, --allow-cpu)" >&2; exit 2 ;;
  esac
done
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

mkdir -p "$OUT/runs"
LOG=$OUT/log.txt
: > "$LOG"

GPU_FLAG=(--require-gpu)
if [ "$ALLOW_CPU" = 1 ]; then
  GPU_FLAG=()
else  # fail fast, before any model; every bench process checks again (torch imported first, as there)
  CHECK='import torch, jax
from jaxcell.bench import require_gpu
from jaxcell.errors import UserError
try:
    require_gpu(jax.devices()[0].platform, torch.cuda.is_available())
except UserError as e:
    raise SystemExit(str(e))'
  if ! problem=$("$PYTHON" -c "$CHECK" 2>&1); then
    echo "bench/gpu.sh: not measuring: ${problem##*$'\n'}" | tee -a "$LOG" >&2
    exit 3
  fi
fi

if [ "$QUICK" = 1 ]; then
  MODELS=${MODELS:-lightnetcell}
  SIZE=32; STEPS=2; WARMUP=1; BUDGET=${BUDGET_S:-120}; DEVICES=1,2
  EXTRA=(--model-arg "widths=(8,16,16)" --model-arg hidden=16)
  # precision, frameworks, models ("-": MODELS), devices ("-": DEVICES), per-device batch ("-": batch_for)
  PASSES=("fp32,bf16 jax,torch - - -" "fp32 pipeline - 1 -")
  PIPELINE_MODELS=${PIPELINE_MODELS:-lightnetcell}
else
  MODELS=${MODELS:-$("$PYTHON" -c "import jaxcell.models as m; print(' '.join(m.names()))")}
  SIZE=224; STEPS=${STEPS:-10}; WARMUP=2; BUDGET=${BUDGET_S:-540}; DEVICES=1,2,4,8
  EXTRA=()
  HEAD=${HEAD_MODELS:-resnet18,resnet50}
  PASSES=("bf16 jax,torch-compile $HEAD 1 -" "bf16 jax,torch - - -" "bf16 jax,torch $HEAD 1 32"
          "fp32 jax,torch - - -" "bf16 pipeline - 1 -" "bf16 torch-compile - - -" "fp32 torch-compile - - -")
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

MERGE='import glob, json, os, sys
from jaxcell import bench
out = sys.argv[1]
reports = []
for p in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
    try:
        reports.append(json.load(open(p)))
    except ValueError:  # a process killed while writing
        print(f"unreadable (cut short): {p}")
merged = bench.merge(reports)
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(merged, f, indent=2)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(bench.summary_markdown(merged["results"]))
rows = merged["results"]
print(f"{len(rows)} results from {len(reports)} runs -> {out}/results.json, {out}/summary.md")'

declare -A MEASURED  # "model precision" pairs whose torch.compile the first pass measured
for pass in "${PASSES[@]}"; do
  read -r precision frameworks pass_models pass_devices pass_batch <<< "$pass"
  models=$MODELS
  [ "$pass_models" != - ] && models=${pass_models//,/ }
  [ "$frameworks" = pipeline ] && models=$PIPELINE_MODELS
  devices=$DEVICES
  [ "$pass_devices" != - ] && devices=$pass_devices
  what=(--frameworks "$frameworks" --devices "$devices")
  [ "$frameworks" = pipeline ] && what=(--pipeline --devices "$devices")  # the trainer's step per input pipeline
  for model in $models; do
    if [ "$frameworks" = torch-compile ] && [ -n "${MEASURED[$model $precision]:-}" ]; then
      continue
    fi
    now=$(date +%s)
    if [ "$now" -ge "$DEADLINE" ]; then
      echo "skip $model $precision $frameworks: time budget spent" | tee -a "$LOG"
      continue
    fi
    batch=$(batch_for "$model")
    [ "$pass_batch" != - ] && batch=$pass_batch
    json=$OUT/runs/${model}_${precision//,/-}_${frameworks//,/-}_b${batch}.json
    echo "== $model $precision $frameworks (batch $batch per device, $((DEADLINE - now)) s left)" | tee -a "$LOG"
    # The harness starts no runner after the deadline; the timeout, the time left, ends one that
    # runs past it (the runners it finished are in its JSON already).
    timeout --kill-after=10 $((DEADLINE - now)) "$PYTHON" -m jaxcell.cli bench --model "$model" \
      --image-size "$SIZE" --batch-size "$batch" --precision "$precision" \
      "${what[@]}" --steps "$STEPS" --warmup "$WARMUP" ${GPU_FLAG[@]+"${GPU_FLAG[@]}"} \
      --deadline "$DEADLINE" --json "$json" ${EXTRA[@]+"${EXTRA[@]}"} >> "$LOG" 2>&1 \
      || echo "   exit status $? ($model $precision $frameworks)" | tee -a "$LOG"
    [ "$frameworks" = "jax,torch-compile" ] && MEASURED[$model $precision]=1
    "$PYTHON" -c "$MERGE" "$OUT" >> "$LOG" 2>&1
  done
done
"$PYTHON" -c "$MERGE" "$OUT"
