#!/usr/bin/env bash
# The GPU check in one go: the ImageNet-shape step benchmark, then a CIFAR-10 run on a time budget with
# on-device augmentation, scored by kNN on held-out images. Results go to $OUT (default gpu_results/).
#   python scripts/pack_cifar.py            # here: .gpu/cifar10.zip, 20,000 train + 5,000 val images
#   bash scripts/gpu_check.sh               # there (BUDGET=5m by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}; BUDGET=${BUDGET:-5m}; BENCH_STEPS=${BENCH_STEPS:-5}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"

# 1. step benchmark, ImageNet shape (ViT-S/16, 2x224 + 10x96, batch 128, K = 8192), as in the issue's anchor
python train.py --preset cifar10 --dataset synthetic --arch vit_small --patch-size 16 --global-size 224 --local-size 96 \
    --local-crops 10 --batch-size 128 --out-dim 8192 --benchmark "$BENCH_STEPS" --device cuda --device-augment \
    ${BENCH_FLAGS:-} | tail -n 1 | tee -a "$OUT/bench.jsonl"

# 2. CIFAR-10 on a budget, end to end from decoded PNGs (first 2,000 of each class; the last 500 held out)
DATA=${DATA:-/tmp/cifar10}
[ -d "$DATA/train" ] || python -m zipfile -e .gpu/cifar10.zip "$DATA"
python train.py --preset cifar10 --data-path "$DATA/train" --holdout-per-class 500 --budget "$BUDGET" \
    --device-augment --knn-every 100000 --ckpt-every 100000 --output-dir "$OUT/cifar10" ${TRAIN_FLAGS:-} \
    2>&1 | tee "$OUT/cifar10_train.log" | grep -v "^epoch .* step" || true
tail -n 1 "$OUT/cifar10/log.jsonl"
rm -f "$OUT/cifar10/checkpoint.pth"  # ~100 MB; the log keeps the figures
