#!/usr/bin/env bash
# Resume (or start) training of the shipped MedLAM from this folder: bash command.sh
# Images: OpenKBP train split (170 scans, images only); validation: the 33 validation scans (RDR error, mm).
# The best weights so far are ../pretrained_medlam.pt (fp16 export); a resumed run writes medlam_default.pt
# only when it beats the saved best_metric, and then: medlsam export medlam_default.pt --out ../pretrained_medlam.pt --half
set -euo pipefail
cd "$(dirname "$0")"
resume=(); [ -f medlam_default.state.pt ] && resume=(--resume medlam_default.state.pt)
../../../../.venv/bin/medlsam train --images train.txt --val-images val.txt --out medlam_default.pt \
  --cache "${GRID_CACHE:-/tmp/medlsam-grid-cache}" --epochs 24 --iterations-per-epoch 100 --batch-size 3 \
  --learning-rate 1e-3 --seed 2023 --time-limit 10800 "${resume[@]}"
