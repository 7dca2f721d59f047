#!/usr/bin/env bash
# Reproduce the shipped demonstration models from scratch on a CPU (a few hours on 2 cores).
# Every step resumes or skips what is already done, so the script can be re-run after an interruption.
#
#   Training/train_demo_models.sh [WORK_DIR]     (default: ./demo_training)
#
# BASE_CONFIG and CONTROLNET_CONFIG choose other training configurations, e.g. for a smoke run of
# the whole pipeline in minutes: BASE_CONFIG=Training/configs/tiny.yaml
# CONTROLNET_CONFIG=Training/configs/controlnet_tiny.yaml Training/train_demo_models.sh /tmp/smoke
#
# Result: WORK_DIR/models/ holds the base model and the two ControlNets (.safetensors + .json cards).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-demo_training}"
PYTHON="${PYTHON:-python}"
BASE_CONFIG="${BASE_CONFIG:-Training/configs/demo.yaml}"
CONTROLNET_CONFIG="${CONTROLNET_CONFIG:-Training/configs/controlnet_demo.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NOTE1="Demonstration model trained on four CT scans; not for clinical use."
NOTE2="Three of the four scans have body-threshold labels only (TotalSegmentator could not run offline)."
DATA="Offline-installable CT at 3 mm: totalsegmentator 2.18.0 test data (abdomen CT slices 0-77 with body-threshold labels, upper-abdomen DICOM series with TotalSegmentator labels, chest CTA with body-threshold labels; Apache-2.0) and the InVesalius 'Cranium' head CT (Debian invesalius-examples, GPL-2, body-threshold labels). Slices 78-111 of the abdomen CT, which contain the bundled sample, are held out."

"$PYTHON" -m Training.demo_data --output "$WORK/raw"
"$PYTHON" -m Training.prepare_data --csv "$WORK/raw/cases.csv" --output "$WORK/prepared" --spacing 3 --threshold-labels
"$PYTHON" -m Training.pretrain --config "$BASE_CONFIG" --data "$WORK/prepared" --output "$WORK/base" \
    --export meddiff-fm-demo@0.1 --training-data "$DATA" --note "$NOTE1" --note "$NOTE2"
BASE="$WORK/base/meddiff-fm-demo-0.1.safetensors"

"$PYTHON" -m Training.make_pairs sr --data "$WORK/prepared" --output "$WORK/sr_pairs" --thickness 9
"$PYTHON" -m Training.make_pairs synthetic-lesions --data "$WORK/prepared" --output "$WORK/lesions" --count 24
"$PYTHON" -m Training.finetune_controlnet --task sr --base "$BASE" --config "$CONTROLNET_CONFIG" \
    --data "$WORK/sr_pairs" --output "$WORK/sr" --export meddiff-fm-demo-sr@0.1 \
    --training-data "Thick/thin pairs (9 mm slabs of 3 mm slices) from the base model's training data." --note "$NOTE1" &
SR_PID=$!
"$PYTHON" -m Training.finetune_controlnet --task lesion --base "$BASE" --config "$CONTROLNET_CONFIG" \
    --data "$WORK/lesions" --output "$WORK/lesion" --export meddiff-fm-demo-lesion@0.1 \
    --training-data "24 synthetic ellipsoid liver lesions (5-14 mm radii, -70 to -25 HU contrast) inserted in the upper-abdomen DICOM series." \
    --note "$NOTE1" --note "Lesions are synthetic; the model has never seen a real lesion." &
LESION_PID=$!
wait "$SR_PID"
wait "$LESION_PID"

mkdir -p "$WORK/models"
for run in base sr lesion; do cp "$WORK/$run"/meddiff-fm-demo*-0.1.safetensors "$WORK/$run"/meddiff-fm-demo*-0.1.json "$WORK/models/"; done
echo "models in $WORK/models"
