#!/usr/bin/env bash
# Semi-supervised vs supervised on the calibrated 300-image variant of docs/results.md, several arms at once on one
# machine (a GPU, or the CPU with PY=.venv/bin/python) (the study's phase 2 with 3 seeds per arm). Run from the repository root on the GPU machine:
#   BASE=<burn-in save_pretrained folder> S=1000 bash benchmarks/run_gpu_semi.sh
# Wheels for packages the GPU image lacks are expected in .whl/ and .whl_arrow/ (as benchmarks/run_h100.sh); ARROW_TAR=
# a .tar.xz of the pyarrow wheel's files replaces .whl_arrow/ where the 64 MiB transfer limit needs it.
# Each arm is one benchmarks/ablation.py invocation; all arms run concurrently; after DEADLINE seconds whatever has
# finished (results.json, log.txt with every evaluation) is copied to $OUT (or outputs/gpu_semi).
set -uo pipefail
S=${S:-1000}
BASE=${BASE:?the burn-in model folder}
WORK=${WORK:-/tmp/gpu_semi}
DEST=${OUT:-outputs/gpu_semi}
DEADLINE=${DEADLINE:-520}
export PYTHONPATH="$PWD:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
if [ -d .whl ] && ! $PY -c "import datasets, pycocotools" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  if ! $PY -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
    if [ -n "${ARROW_TAR:-}" ]; then tar xJf "$ARROW_TAR" -C /tmp/site  # a wheel's files, xz-compressed to fit
    else $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_arrow/*.whl
    fi
  fi
fi
mkdir -p /tmp/site; $PY -c "import torch, transformers, datasets, pycocotools; print(torch.__version__, transformers.__version__, datasets.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
# The study's data and model flags (benchmarks/run_cpu_study.sh ARGS, 300 training images), evaluation every S/4.
ARGS=(--synthetic_num_train 300 --synthetic_num_val 150
      --synthetic_overrides num_classes=5,image_size=112:144,radius_range=6:28,objects_per_image=2:8,distractors_per_image=1:4,clutter=0.5,distractor_combo_prob=0.0
      --backbone resnet10t --d_model 64 --encoder_layers 2 --decoder_layers 2 --ffn_dim 256 --attention_heads 8
      --num_queries 60 --num_denoising_queries 30 --num_detections 100 --qrm_reduced_dim 32
      --image_scales 96,112,128 --max_image_size 160 --eval_image_size 112
      --labeled_batch_size 2 --unlabeled_batch_size 4 --learning_rate 5e-4 --backbone_lr_multiplier 1.0
      --max_grad_norm 1.0 --ema_momentum 0.995 --eval_steps $((S / 4)) --checkpointing_steps 100000 --num_workers 1
      --logging_steps 50 --deformable_attention_backend pytorch --model_name_or_path "$BASE" --max_steps "$S" --one_to_many_steps "$S")
arm() {  # arm NAME VARIANTS SEEDS [train_ssod flags...]
  local name=$1 variants=$2 seeds=$3; shift 3
  $PY benchmarks/ablation.py --output_dir "$WORK/$name" --variants "$variants" --seeds "$seeds" --parallel 6 \
      -- "${ARGS[@]}" "$@" > "$WORK/$name.log" 2>&1
}
rm -rf "$WORK" && mkdir -p "$WORK" "$DEST" && DEST=$(cd "$DEST" && pwd)
# ARMS: one line per arm, "NAME VARIANTS SEEDS FLAGS..." (default: the sweep of docs/results.md, 2026-11-26)
ARMS=${ARMS:-"w4_t35 supervised,sparse_semi_detr 0,1,2 --pseudo_label_threshold 0.35
w1_t35 sparse_semi_detr 0,1,2 --unsup_weight 1.0 --pseudo_label_threshold 0.35
w1_t50 sparse_semi_detr 0,1,2 --unsup_weight 1.0 --pseudo_label_threshold 0.5
w1_t50_nomod semi_detr 0 --unsup_weight 1.0 --pseudo_label_threshold 0.5"}
while read -r line; do
  [ -n "$line" ] && arm $line &
done <<< "$ARMS"
start=$(date +%s)
while [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - start )) -lt "$DEADLINE" ]; do sleep 5; done
echo "===== collected after $(( $(date +%s) - start )) s; still running: $(jobs -r | wc -l)"
pkill -f "train_ssod.py --output_dir $WORK/" 2>/dev/null; kill $(jobs -p) 2>/dev/null
cd "$WORK" && find . \( -name results.json -o -name log.txt -o -name ablation.json -o -name '*.log' \) \
    -exec cp --parents {} "$DEST/" \;
grep -h "teacher AP" */*/log.txt | tail -n 40
