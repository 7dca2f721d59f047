#!/usr/bin/env bash
# Reproduce the shipped 1 mm base model (meddiff-fm-1mm) on a CPU: fetch the offline-installable CT,
# prepare it at 1 mm, pre-train with Training/configs/base1mm.yaml. Every step resumes or skips what
# is already done; run it again after an interruption, or with STOP_AFTER_MINUTES to train in sessions.
#
#   Training/train_base1mm.sh [WORK_DIR]     (default: ./base1mm_training)
#
# EXPORT=1 exports the last checkpoint's EMA weights when the run stops (the shipped model stopped
# long before the configuration's 20,000 steps; its card gives the count and the hours).
# INIT=models/meddiff-fm-1mm-0.4.safetensors warm-starts a new run from shipped weights.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-base1mm_training}"
PYTHON="${PYTHON:-python}"
VERSION="${VERSION:-0.7}"
ARGS=()
[ -n "${STOP_AFTER_MINUTES:-}" ] && ARGS=(--stop-after-minutes "$STOP_AFTER_MINUTES")
[ -n "${INIT:-}" ] && ARGS+=(--init "$INIT")
DATA="Offline-installable CT, resampled to 1 mm: totalsegmentator 2.18.0 test data (the whole abdomen CT at 3 mm with its TotalSegmentator labels, weighted three times (case_weights); chest CTA at 1.5 mm (arterial phase) with the TotalSegmentator masks of the archive's aorta and pulmonary reports: heart, aorta and branches, T12; Apache-2.0) and the InVesalius 'Cranium' head CT (0.96 x 0.96 x 1.5 mm, Debian invesalius-examples, GPL-2, body-threshold labels). Held out of all training and tuning: the upper-abdomen DICOM series (0.98 x 0.98 x 2 mm)."

"$PYTHON" -m Training.demo_data --output "$WORK/raw" --cases base1mm
"$PYTHON" -m Training.prepare_data --csv "$WORK/raw/cases.csv" --output "$WORK/prepared" --spacing 1 --threshold-labels
"$PYTHON" -m Training.pretrain --config Training/configs/base1mm.yaml --data "$WORK/prepared" --output "$WORK/base" "${ARGS[@]}"
if [ -n "${EXPORT:-}" ]; then
    "$PYTHON" -m Training.pretrain --config Training/configs/base1mm.yaml --data "$WORK/prepared" --output "$WORK/base" \
        --export "meddiff-fm-1mm@$VERSION" --export-only --training-data "$DATA" \
        --note "Trained on three CT scans on a 2-core CPU; not for clinical use."
fi
