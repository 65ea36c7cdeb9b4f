#!/usr/bin/env bash
# Resume (or start) training of the shipped MedLAM from this folder: bash command.sh
# Images: OpenKBP train split (170 scans, images only); validation: the 33 validation scans (RDR error, mm).
# Epochs 1-6 ran with a 24-epoch cosine schedule of 100 iterations per epoch; the run was resumed with EPOCHS=8, ITERATIONS=50 (and OMP_NUM_THREADS=1 on the shared CPU) so that the learning rate
# anneals to zero within the 3-hour budget (the schedule is recomputed from --epochs on resume).
# The best weights so far are lib/medlsam/weights/pretrained_medlam.pt (fp16 export, package data); a resumed run writes medlam_default.pt
# only when it beats the saved best_metric, and then: medlsam export medlam_default.pt --out ../../../../lib/medlsam/weights/pretrained_medlam.pt --half
set -euo pipefail
cd "$(dirname "$0")"
resume=(); [ -f medlam_default.state.pt ] && resume=(--resume medlam_default.state.pt)
../../../../.venv/bin/medlsam train --images train.txt --val-images val.txt --out medlam_default.pt \
  --cache "${GRID_CACHE:-/tmp/medlsam-grid-cache}" --epochs "${EPOCHS:-8}" --iterations-per-epoch "${ITERATIONS:-50}" --batch-size 3 \
  --learning-rate 1e-3 --seed 2023 --time-limit 10800 "${resume[@]}"
