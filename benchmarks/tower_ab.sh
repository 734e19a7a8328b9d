#!/usr/bin/env bash
# An A/B of the base recipe on two vision towers: the same recipe, steps and schedule, the two runs side by
# side on one machine (a GPU shares well: the tiny models leave it mostly idle), each stopped after MINUTES
# and evaluated on VAL_N validation items every EVAL_EVERY steps. The per-family table at each evaluation
# goes to OUT/tower-ab.md (benchmarks/tower_ab_table.py); each run's metrics.jsonl and loss.png beside it.
#
#   TOWER_A=runs/vision-tiny/final TOWER_B=runs/vision-shape/final OUT=runs/tower-ab bash benchmarks/tower_ab.sh
#   DEVICE=cpu MINUTES=0.3 VAL_N=20 EVAL_EVERY=2 ... bash benchmarks/tower_ab.sh   # a smoke run of the script
#
# Used to ask whether a tower pre-trained with the shape head (vision_shape_weight) lets the frozen-tower base
# stage learn the shape and presence families, which stay at chance on the default tower.
set -u
OUT=${OUT:-runs/tower-ab}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RECIPE=${RECIPE:-recipes/base-tiny.yaml}
MINUTES=${MINUTES:-6}
VAL_N=${VAL_N:-500}
EVAL_EVERY=${EVAL_EVERY:-250}
WORKERS=${WORKERS:-6}
EXTRA=${EXTRA:-}   # more recipe overrides for both runs
: "${TOWER_A:?name the control tower (a SigLIP folder)}" "${TOWER_B:?name the tower under test}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
exec > >(tee "$OUT/tower-ab.log") 2>&1
echo "=== $(date -u +%FT%TZ) device $DEVICE, $RECIPE, $MINUTES min per run, eval on $VAL_N items every $EVAL_EVERY steps"
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
"gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
git log --oneline -1 2>/dev/null || true

run() {  # run NAME TOWER
  # shellcheck disable=SC2086  # EXTRA is a list of words
  "$PYTHON" -m visor train --device "$DEVICE" --no-progress "$RECIPE" out_dir="$OUT/$1" vision_init="$2" \
    max_minutes="$MINUTES" eval_every="$EVAL_EVERY" data.val_n="$VAL_N" data.workers="$WORKERS" \
    save_every=100000 log_every=10 threads=null $EXTRA > "$OUT/$1.log" 2>&1
  echo "=== $1 ($2): exit $?"
}
run a "$TOWER_A" &
pid_a=$!
run b "$TOWER_B" &
pid_b=$!
wait "$pid_a" "$pid_b"  # by pid: a bare wait would also wait for the tee above
for name in a b; do
  cp "$OUT/$name/metrics.jsonl" "$OUT/$name-metrics.jsonl" 2>/dev/null
  cp "$OUT/$name/loss.png" "$OUT/$name-loss.png" 2>/dev/null
  tail -3 "$OUT/$name.log"
done
"$PYTHON" benchmarks/tower_ab_table.py "$OUT/a-metrics.jsonl" "$OUT/b-metrics.jsonl" \
  --names "A: $TOWER_A" "B: $TOWER_B" | tee "$OUT/tower-ab.md"
rm -rf "$OUT"/a "$OUT"/b  # checkpoints are not the point; metrics and plots are kept beside
