#!/usr/bin/env bash
# The reduced-scale study of docs/results.md ("CPU study"), as it was run on the 2-core CPU (no GPU lent).
# Usage: bash benchmarks/run_cpu_study.sh STAGE...   stages: start burnin reeval tau phase2   (in this order)
#   start:  supervised from scratch, 1000 steps, 10 % and 100 % labels (two processes, one thread each)
#   burnin: 10 %: 2000 more steps from the start model; 100 %: 2000 + S more (the calibration arm, equal steps)
#   reeval: the burn-in's final weights evaluated again with the one-to-many NMS (its last evaluation ran at step T1
#           and, before the fix of the trainer's evaluation stage, without NMS): resumes a copy at its last step
#   tau:    label-free tau calibration of the burn-in teacher (benchmarks/pseudo_label_rate.py); BASE = the teacher's
#           folder, default $OUT/burnin/best_model (phase2 starts from BASE too)
#   small:  the calibration again with 300 training images (30 labeled at 10 %): supervised from scratch, 3000 steps,
#           all one-to-many (evaluated with its NMS), 10 % and 100 % labels
#   phase2: S steps of each ablation variant from the burn-in model, TAU=<chosen tau> (seeds 0,1,2 for supervised
#           and Sparse Semi-DETR, seed 0 for the single-module variants); T1 (default S: every step one-to-many)
set -euo pipefail
OUT=${OUT:-outputs/cpu_study2}
S=${S:-1000}
T1=${T1:-$S}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Data: 1000 train / 150 val images of an easier synthetic set (5 shape classes, distractors are only the extra
# shapes); model: ResNet-10-T from scratch, d_model 64, 2 + 2 layers; views 96-128 px.
ARGS=(--synthetic_num_train 1000 --synthetic_num_val 150
      --synthetic_overrides num_classes=5,image_size=112:144,radius_range=6:28,objects_per_image=2:8,distractors_per_image=1:4,clutter=0.5,distractor_combo_prob=0.0
      --synthetic_cache_dir "$OUT/data_cache"
      --backbone resnet10t --d_model 64 --encoder_layers 2 --decoder_layers 2 --ffn_dim 256 --attention_heads 8
      --num_queries 60 --num_denoising_queries 30 --num_detections 100 --qrm_reduced_dim 32
      --image_scales 96,112,128 --max_image_size 160 --eval_image_size 112
      --labeled_batch_size 2 --unlabeled_batch_size 4 --learning_rate 5e-4 --backbone_lr_multiplier 1.0
      --max_grad_norm 1.0 --ema_momentum 0.995 --eval_steps 500 --checkpointing_steps 100000 --num_workers 1
      --logging_steps 50)
SUP=(--supervised_only --query_mode none --use_rpf false --seed 0)
for stage in "$@"; do
  echo "===== $stage $(date +%T)"
  case $stage in
    start)
      python examples/train_ssod.py --output_dir "$OUT/start10" --labeled_percent 10 "${SUP[@]}" "${ARGS[@]}" \
          --max_steps 1000 --one_to_many_steps 1000 > "$OUT/start10.log" 2>&1 &
      python examples/train_ssod.py --output_dir "$OUT/start100" --labeled_percent 100 "${SUP[@]}" "${ARGS[@]}" \
          --max_steps 1000 --one_to_many_steps 1000 > "$OUT/start100.log" 2>&1
      wait ;;
    burnin)
      python examples/train_ssod.py --output_dir "$OUT/burnin" --labeled_percent 10 "${SUP[@]}" "${ARGS[@]}" \
          --model_name_or_path "$OUT/start10/best_model" --max_steps 2000 --one_to_many_steps 2000 \
          > "$OUT/burnin.log" 2>&1 &
      python examples/train_ssod.py --output_dir "$OUT/supervised_100_seed0" --labeled_percent 100 "${SUP[@]}" \
          "${ARGS[@]}" --model_name_or_path "$OUT/start100/best_model" --max_steps $((2000 + S)) \
          --one_to_many_steps $((2000 + S / 2)) > "$OUT/sup100.log" 2>&1 &
      wait ;;
    reeval)
      rm -rf "$OUT/burnin_reeval" && cp -r "$OUT/burnin" "$OUT/burnin_reeval"
      python examples/train_ssod.py --output_dir "$OUT/burnin_reeval" --labeled_percent 10 "${SUP[@]}" "${ARGS[@]}" \
          --model_name_or_path "$OUT/start10/best_model" --max_steps 2000 --one_to_many_steps 2000 \
          --resume_from_checkpoint latest > "$OUT/reeval.log" 2>&1 ;;
    small)
      for p in 10 100; do
        python examples/train_ssod.py --output_dir "$OUT/small_sup$p" --labeled_percent $p "${SUP[@]}" "${ARGS[@]}" \
            --synthetic_num_train 300 --max_steps 3000 --one_to_many_steps 3000 > "$OUT/small_sup$p.log" 2>&1 &
      done
      wait ;;
    tau)
      python benchmarks/pseudo_label_rate.py --model "${BASE:-$OUT/burnin/best_model}" -- "${ARGS[@]}" | tee "$OUT/tau.json" ;;
    phase2)
      python benchmarks/ablation.py --output_dir "$OUT/phase2" --seeds 0,1,2 --parallel 2 \
          --variants supervised,sparse_semi_detr,semi_detr,qrm_only,rpf_only \
          --single_seed_variants semi_detr,qrm_only,rpf_only -- "${ARGS[@]}" \
          --model_name_or_path "${BASE:-$OUT/burnin/best_model}" --max_steps "$S" --one_to_many_steps "$T1" \
          --pseudo_label_threshold "${TAU:?set TAU from the tau stage}" ;;
  esac
done
