#!/usr/bin/env bash
# One prepared GPU run: the cost benchmark at the real LLaVA-OV-0.5B and 1.5B geometries (bf16, random
# weights) and a short DDP/NCCL training run of the tiny base recipe, on whatever CUDA machine runs it.
# Every part is time-boxed and independent (one failing part does not stop the next); all outputs are
# packed into OUT/gpu-suite.tar.gz (plus the log beside it).
#
#   OUT=runs/gpu-suite bash benchmarks/gpu_suite.sh            # python3 must see torch with CUDA
#   PYTHON=.venv/bin/python OUT=... bash benchmarks/gpu_suite.sh
#   PREFILL_BATCH=8 TRAIN=0 OUT=... bash benchmarks/gpu_suite.sh  # the compute-bound regime: 8 prompts per
#       prefill, the image rows with the most visual tokens, no decode sweep and no training part
#   RESOLUTION=1 BENCH=0 TRAIN=0 OUT=... bash benchmarks/gpu_suite.sh  # resolution on request end to end
#       (benchmarks/resolution_e2e.py: vision tower + LLM, base-only vs full vs routed) at both geometries
set -u
OUT=${OUT:-runs/gpu-suite}
PYTHON=${PYTHON:-python3}
QUICK=${QUICK:-0}            # 1: a smoke run of the script itself (used on CPU before a GPU run)
DEVICE=${DEVICE:-cuda}
PREFILL_BATCH=${PREFILL_BATCH:-1}
TRAIN=${TRAIN:-1}
BENCH=${BENCH:-1}
RESOLUTION=${RESOLUTION:-0}
BENCH_EXTRA=${BENCH_EXTRA:-}   # more `visor bench` arguments, e.g. "--rows base,1152x1152 --configs baseline,visor-ca"
TAG=${TAG:-b$PREFILL_BATCH}    # names the bench folders
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
WORK="$OUT/suite"
mkdir -p "$WORK"
LOG="$OUT/gpu-suite.log"
exec > >(tee "$LOG") 2>&1

part() {  # part NAME SECONDS COMMAND...: run one time-boxed part, record its exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  echo "$name $rc $((SECONDS - start))" >> "$WORK/parts.txt"
}

part environment 60 bash -c "nvidia-smi || true; $PYTHON -c 'import torch, transformers, platform; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(\"transformers\", transformers.__version__, \"python\", platform.python_version()); \
print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'; git log --oneline -1 || true"

if [ "$QUICK" = 1 ]; then
  BENCH_ARGS=(--quick --rows base --configs baseline,visor-ca)
  GEOMETRIES=(llava-ov-0.5b)
  TRAIN_STEPS=2
else
  BENCH_ARGS=(--repeats 5 --decode-tokens 8)
  GEOMETRIES=(llava-ov-0.5b llava-ov-1.5b)
  TRAIN_STEPS=60
fi
if [ "$PREFILL_BATCH" != 1 ]; then
  BENCH_ARGS+=(--prefill-batch "$PREFILL_BATCH" --rows base,640x480,1152x1152,1056x1280 --decode-tokens 2
               --decode-batches 1)
fi

for geometry in "${GEOMETRIES[@]}"; do
  [ "$BENCH" = 1 ] || continue
  # shellcheck disable=SC2086  # BENCH_EXTRA is a list of words
  part "bench-$geometry-$TAG" 180 "$PYTHON" -m visor bench --geometry "$geometry" --dtype bf16 \
    --device "$DEVICE" "${BENCH_ARGS[@]}" $BENCH_EXTRA --out "$WORK/bench-$geometry-$TAG"
done

# Resolution on request: per geometry, the e2e table (stdout, its last line JSON) in resolution-GEOMETRY-TAG.txt.
for geometry in "${GEOMETRIES[@]}"; do
  [ "$RESOLUTION" = 1 ] || continue
  if [ "$QUICK" = 1 ]; then res_args=(--size 384 384 --repeats 1 --read-after 1); else res_args=(--repeats 10); fi
  res_args+=(--batch "$PREFILL_BATCH")
  part "resolution-$geometry-$TAG" 240 bash -c "\"$PYTHON\" benchmarks/resolution_e2e.py --geometry $geometry --device $DEVICE \
    ${res_args[*]} > \"$WORK/resolution-$geometry-$TAG.txt\" 2>&1; rc=\$?; tail -12 \"$WORK/resolution-$geometry-$TAG.txt\"; exit \$rc"
done

# The tiny base recipe under torchrun (one process: NCCL on a GPU, gloo on CPU), random vision tower,
# evaluated once, at its last step, on 16 items (as every training run is): checks the GPU training and
# evaluation paths end to end and gives its samples/s (metrics.jsonl).
[ "$TRAIN" = 1 ] && part train-base-tiny 120 "$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_port 29533 \
  -m visor train --device "$DEVICE" --no-progress recipes/base-tiny.yaml \
  out_dir="$WORK/train-base-tiny" vision_init=null max_steps=$TRAIN_STEPS eval_every=100000 \
  save_every=100000 log_every=10 threads=null data.val_n=16
rm -rf "$WORK"/train-base-tiny/checkpoints "$WORK"/train-base-tiny/final  # weights are not the point

tar -czf "$OUT/gpu-suite.tar.gz" -C "$OUT" suite
echo "=== parts (name exit seconds):"; cat "$WORK/parts.txt"
