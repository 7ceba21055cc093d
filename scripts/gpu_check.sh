#!/usr/bin/env bash
# The GPU figures in one command, at most 8 minutes on one H200, one JSON out: $OUT/gpu_check.json.
#   here:   python scripts/pack_cifar.py --src "$IBOT_CIFAR10_DIR"   # .gpu/cifar10.zip: 1,500 + 500 CIFAR-10 PNGs per class, 46 MiB
#   there:  bash scripts/gpu_check.sh         # OUT=runs/gpu_check by default; ZIP=.gpu/cifar10.zip (git ignores
#                                             # .gpu/: copy it beside the checkout)
#           bash scripts/gpu_check.sh --dry-run   # (or DRY_RUN=1) the same stages on this CPU at tiny sizes, seconds
# The stages, in this order, each under its own time limit:
#   machine       the card, torch and torchvision, CPU cores
#   step_eager    bench.py at the official ViT-S/16 shape (2x224 + 10x96 crops, batch 64 per GPU as the published
#                 command, K = 8192, bf16, views made on the GPU): img/s, peak memory, MFU
#   cifar10       the main job, `python train.py --budget 5m` (on CUDA the cifar10 preset), on the zip's images
#                 unpacked into DATA (default /tmp/ibot_cifar10; the last 500 of each class held out for kNN): its
#                 kNN curve and last row from log.jsonl
#   step_compile  step_eager with --compile (its compilation inside the warm-up steps), in the time left
# A stage that fails or runs out of time leaves its exit code and the tail of its stderr in the JSON; the stages
# after it still run, and the figures of every other stage stay. The command exits 1 when any stage failed.
# TRAIN_FLAGS and STEP_FLAGS add flags to the cifar10 and the step stages.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT/stages"
export PYTHONUNBUFFERED=1
STEP=(--preset imagenet-vit-s16 --dataset synthetic --batch-size 64 --out-dim 8192 --precision bf16 --device-augment)
if [ "$DRY_RUN" = 1 ]; then  # the same commands at tiny sizes on the CPU; --compile runs with compilation disabled
  # (TORCH_COMPILE_DISABLE), as inductor's CPU build alone would take minutes here
  DEADLINE=300; EAGER_S=60; CIFAR_S=60; DATA=${DATA:-$OUT/data_dry}
  STEP+=(--device cpu --arch vit_nano --global-size 32 --local-size 16 --batch-size 2 --out-dim 64
         --head-hidden-dim 64 --head-bottleneck-dim 32 --precision fp32 --steps 1)  # bf16 crawls on CPUs without bf16 instructions
  CIFAR=(--preset cifar10 --device cpu --arch vit_nano --global-size 16 --local-size 8 --local-crops 2 --out-dim 64
         --head-hidden-dim 64 --head-bottleneck-dim 32 --batch-size 8 --workers 0 --holdout-per-class 8
         --knn-bank-per-class 16 --budget 10s)
  COMPILE_ENV=(TORCH_COMPILE_DISABLE=1)
  if [ -z "${ZIP:-}" ]; then  # a tiny CIFAR-like folder, packed as a real run's data is
    ZIP=$OUT/cifar10_dry.zip
    python - "$OUT/cifar10_dry_src" <<'EOF' || exit 1
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for c in ("cat", "dog"):
    (Path(sys.argv[1]) / c).mkdir(parents=True, exist_ok=True)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(Path(sys.argv[1]) / c / f"{i:03d}.png")
EOF
    python scripts/pack_cifar.py --src "$OUT/cifar10_dry_src" --train-per-class 16 --val-per-class 8 --out "$ZIP" \
      || exit 1
  fi
else
  DEADLINE=480; EAGER_S=75; CIFAR_S=330; DATA=${DATA:-/tmp/ibot_cifar10}; ZIP=${ZIP:-.gpu/cifar10.zip}
  STEP+=(--device cuda --steps 10)
  CIFAR=(--budget 5m)
  COMPILE_ENV=()
fi
read -r -a EXTRA_STEP <<< "${STEP_FLAGS:-}"
read -r -a EXTRA_TRAIN <<< "${TRAIN_FLAGS:-}"

stage() {  # NAME LIMIT_S COMMAND...: runs COMMAND within LIMIT_S and what is left of the deadline
  local name=$1 cap=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS
  shift 2
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    echo "skipped: ${left}s left of the ${DEADLINE}s deadline" > "$OUT/stages/$name.err"
    echo 124 > "$OUT/stages/$name.rc"
  else
    timeout -k 20 "$limit" "$@" > "$OUT/stages/$name.out" 2> "$OUT/stages/$name.err"
    echo $? > "$OUT/stages/$name.rc"
  fi
  echo "$name: exit $(cat "$OUT/stages/$name.rc") after $((SECONDS - t0))s (limit ${limit}s)"
}

rm -f "$OUT"/stages/*
stage machine 60 python -c '
import json, os, torch, torchvision
cuda = torch.cuda.is_available()
print(json.dumps(dict(card=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__,
                      cuda=torch.version.cuda, torchvision=torchvision.__version__, cpu_cores=os.cpu_count(),
                      gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None)))'
stage step_eager "$EAGER_S" python bench.py "${STEP[@]}" "${EXTRA_STEP[@]}"
if [ -d "$DATA/train" ] || python -m zipfile -e "$ZIP" "$DATA" 2> "$OUT/stages/unpack.err"; then
  rm -rf "$OUT/cifar10"  # this check's own run folder: a fresh run, never a resume
  stage cifar10 "$CIFAR_S" env IBOT_CIFAR10_DIR="$DATA/train" \
    python train.py --output-dir "$OUT/cifar10" "${CIFAR[@]}" "${EXTRA_TRAIN[@]}"
  rm -f "$OUT/cifar10/checkpoint.pth"  # ~100 MB; the log keeps the figures
else
  { echo "cannot unpack $ZIP into $DATA (make it with scripts/pack_cifar.py):"; cat "$OUT/stages/unpack.err"; } \
    > "$OUT/stages/cifar10.err"
  echo 1 > "$OUT/stages/cifar10.rc"
  echo "cifar10: no data ($ZIP)"
fi
stage step_compile $((DEADLINE - SECONDS)) env "${COMPILE_ENV[@]}" python bench.py "${STEP[@]}" --compile \
  "${EXTRA_STEP[@]}"

python - "$OUT" "$DRY_RUN" <<'EOF'
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"

def json_line(text):
    rows = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(rows[-1]) if rows else None

result, failed = dict(dry_run=dry), []
for name in ("machine", "step_eager", "cifar10", "step_compile"):
    rc_file = out / "stages" / f"{name}.rc"
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    text = (out / "stages" / f"{name}.out").read_text() if (out / "stages" / f"{name}.out").exists() else ""
    stage = dict(rc=rc)
    if name == "cifar10":
        log = out / "cifar10" / "log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        keep = ("loss", "img_per_s", "target_entropy", "batch_entropy", "ln_K", "prototypes_used", "feature_cosine")
        stage.update(first_lines=[line for line in text.splitlines()[:6] if not line.startswith("{")],
                     knn_curve=[{k: r[k] for k in ("step", "images_seen", "elapsed_s", "knn_top1")}
                                for r in rows if "knn_top1" in r],
                     last_row={k: rows[-1][k] for k in ("epoch", "step", "images_seen", *keep) if k in rows[-1]}
                     if rows else None)
    else:
        stage.update(json_line(text) or {})
    if rc != 0:
        err = (out / "stages" / f"{name}.err")
        stage["error"] = err.read_text()[-2000:] if err.exists() else "no output"
        failed.append(name)
    result[name] = stage
result["failed"] = failed
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
print(f"{out / 'gpu_check.json'}" + (f": failed {', '.join(failed)}" if failed else ""))
sys.exit(1 if failed else 0)
EOF
