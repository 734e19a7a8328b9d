#!/usr/bin/env bash
# One training recipe on a lent GPU, packed so that its result survives the machine: the run's final model (a
# tar of the folder, split into 15 MiB parts, since a lent machine returns files of at most 16 MiB), its
# metrics.jsonl, loss.png and log go to OUT. Unpack here with `cat OUT/final.tar.part-* | tar -x -C DIR`.
#
#   RECIPE=recipes/base-tiny-focus3.yaml OVERRIDES="init=gpu-carry/base" OUT=runs/gpu-train bash benchmarks/gpu_train.sh
#   DEVICE=cpu MINUTES=0.5 OVERRIDES="... max_steps=3 eval_every=2 data.val_n=4" bash benchmarks/gpu_train.sh   # smoke
#
# MINUTES is a safety stop (the recipe's max_steps sets the schedule): a run stopped by it saves its final model
# with the learning rate not yet annealed, and says so in the log.
set -u
: "${RECIPE:?name the recipe}"
OUT=${OUT:-runs/gpu-train}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-9}
WORKERS=${WORKERS:-14}
SAVE_EVERY=${SAVE_EVERY:-500}   # checkpoints only guard the run on the machine (they do not travel back); the
                                # tiny recipes' 50 cost a GPU run a visible share of its steps
OVERRIDES=${OVERRIDES:-}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
RUN="$OUT/run"
mkdir -p "$OUT"
exec > >(tee "$OUT/train.log") 2>&1
echo "=== $(date -u +%FT%TZ) device $DEVICE, $RECIPE, stop after $MINUTES min"
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
"gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
git log --oneline -1 2>/dev/null || true
# shellcheck disable=SC2086  # OVERRIDES is a list of words
"$PYTHON" -m visor train --device "$DEVICE" --no-progress "$RECIPE" out_dir="$RUN" max_minutes="$MINUTES" \
  data.workers="$WORKERS" save_every="$SAVE_EVERY" threads=null $OVERRIDES
echo "=== train: exit $? at $(date -u +%T)"
cp "$RUN/metrics.jsonl" "$RUN/loss.png" "$OUT/" 2>/dev/null
if [ -d "$RUN/final" ]; then
  tar -C "$RUN" -cf - final | split -b 15M - "$OUT/final.tar.part-"
  ls -l "$OUT"
else
  echo "no final model in $RUN"
fi
rm -rf "$RUN"
