#!/usr/bin/env bash
# Train the 1 mm base models for a fixed time on one borrowed GPU, and hand back the weights in parts
# small enough for a size-limited output folder (issue 12.4).
#
#   Training/gpu_train.sh PACK OUT [MINUTES]      (default 7.5 minutes of training)
#
# PACK is a packed training cache (python -m Training.pack_data pack), so the GPU machine needs
# neither SimpleITK nor the 79 MB of 1 mm NIfTI files; it needs PyTorch and MONAI. On the one GPU two
# runs share the time, each in bfloat16 autocast with channels-last weights (mixed_precision auto):
#   base1mm   Training/configs/gpu_base1mm.yaml, warm-started from models/meddiff-fm-1mm-0.4 (noise
#             prediction, the CPU-trained architecture), exported in float32;
#   large1mm  Training/configs/gpu_large1mm.yaml, the preset with a fourth level, v prediction, from
#             scratch, exported in bfloat16.
# OUT receives the weights split into parts of at most 15 MiB (python -m Training.shards join puts
# them back together and checks them against their cards), and logs.tar.gz: the cards, each run's
# log.csv and console output. On a CPU (no GPU) the same script runs, slowly: check it there first
# with MINUTES=0.2 and WORK=/tmp/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK="$1"
OUT="$2"
MINUTES="${3:-7.5}"
WORK="${WORK:-/tmp/meddiff_gpu_run}"
PYTHON="${PYTHON:-python3}"
INIT="${INIT:-models/meddiff-fm-1mm-0.4.safetensors}"
mkdir -p "$WORK" "$OUT"
DATA="Offline-installable CT at 1 mm (Training.pack_data): the totalsegmentator 2.18.0 test data's whole abdomen CT with its TotalSegmentator labels (weighted three times), its chest CTA with body-threshold labels (Apache-2.0), and the InVesalius 'Cranium' head CT (GPL-2, body-threshold labels). Held out of all training and tuning: the upper-abdomen DICOM series."

"$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor())
EOF
"$PYTHON" -m Training.pack_data unpack --pack "$PACK" --output "$WORK/data"
# Data-loader workers hand batches over in shared memory; a small /dev/shm makes them fail.
shm_kb=$(df -k --output=avail /dev/shm 2>/dev/null | tail -n 1 || echo 0)
if [ "${shm_kb:-0}" -lt 8000000 ]; then mount -o remount,size=16G /dev/shm 2>/dev/null || true; fi
df -h /dev/shm 2>/dev/null | tail -n 1 || true
if command -v nvidia-smi > /dev/null; then
    (while sleep 15; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader; done) \
        > "$WORK/gpu_use.csv" 2>&1 &
    sampler=$!
fi

train() {  # name config [extra pretrain options...]
    local name=$1 config=$2
    shift 2
    "$PYTHON" -m Training.pretrain --config "$config" --data "$WORK/data" --output "$WORK/$name" \
        --stop-after-minutes "$MINUTES" "$@" > "$WORK/$name.console.txt" 2>&1
}
export_run() {  # name config export-name dtype
    "$PYTHON" -m Training.pretrain --config "$2" --data "$WORK/data" --output "$WORK/$1" --export "$3" \
        --export-only --export-dtype "$4" --training-data "$DATA" \
        --note "Trained on three CT scans on one GPU (Training/gpu_train.sh; the hours above count every sitting); not for clinical use." \
        >> "$WORK/$1.console.txt" 2>&1
}

started=$(date +%s)
train base1mm Training/configs/gpu_base1mm.yaml --init "$INIT" &
first=$!
train large1mm Training/configs/gpu_large1mm.yaml &
second=$!
status=0
wait $first || status=$?
wait $second || status=$?
echo "training: $(( $(date +%s) - started )) s, exit status $status"
[ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null || true
tail -n 3 "$WORK"/*/log.csv || true

export_run base1mm Training/configs/gpu_base1mm.yaml meddiff-fm-1mm@0.6 float32 &
first=$!
export_run large1mm Training/configs/gpu_large1mm.yaml meddiff-fm-1mm-large@0.1 bfloat16 &
second=$!
wait $first || status=$?
wait $second || status=$?
for weights in "$WORK"/base1mm/*.safetensors "$WORK"/large1mm/*.safetensors; do
    if [ -e "$weights" ]; then
        "$PYTHON" -m Training.shards split "$weights" --max-mib 15 --output "$OUT/parts" || status=$?
    fi
done
mkdir -p "$OUT/parts"
mv "$OUT"/parts/*.safetensors "$OUT"/ 2>/dev/null || true
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --ignore-failed-read base1mm/log.csv large1mm/log.csv \
    base1mm.console.txt large1mm.console.txt gpu_use.csv -C "$OUT/parts" .
rm -rf "$OUT/parts"
ls -la "$OUT"
exit $status
