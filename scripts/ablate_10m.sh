#!/bin/bash
# Ten-minute runs of the cifar10-cpu preset against one lever each (docs/cpu_recipe.md, "Ten-minute levers").
# Each is `python train.py --budget 10m --seed S [flags]` into runs/ablate10/NAME-sSEED/ (log.jsonl with kNN
# every 250 steps and the diagnostics, curves.png); one at a time, since each run's steps depend on the CPU
# it has to itself. Then: python plot_run.py --compare knn10.png runs/ablate10/*-s*
# usage: bash scripts/ablate_10m.sh [ROW ...]   (default: every row, seed 0; ROW is NAME or NAME:SEED)
set -e
cd "$(dirname "$0")/.."
# the preset as it was before its faster teacher: m from 0.99
M99="--momentum-teacher 0.99"
# the recipe without the preset's three initialisation and view levers (a random patch embedding, drop path 0.1,
# the published crop scales) nor its faster teacher
PLAIN="--no-patch-whitening --drop-path 0.1 --global-scale 0.25 1 --local-scale 0.05 0.25 $M99"
declare -A FLAGS=(
  [cifar10-cpu]=""
  [m0.99]="$M99"
  [m0.95]="--momentum-teacher 0.95"
  [m0.99+lr4e-3]="$M99 --lr 4e-3"
  [m0.99+wsd]="$M99 --lr-schedule wsd"
  [m0.99+batch32]="$M99 --batch-size 32 --knn-every-steps 500"
  [cifar10-cpu+wsd]="--lr-schedule wsd"
  [cifar10-cpu+muon]="--optimizer muon"
  [cifar10-cpu+koleo0.3]="--koleo 0.3"
  [cifar10-cpu+tau0.03]="--teacher-temp 0.03 --warmup-teacher-temp 0.03"
  [cifar10-cpu+lambda0.5]="--lambda2 0.5"
  [plain]="$PLAIN"
  [plain+whitening]="--drop-path 0.1 --global-scale 0.25 1 --local-scale 0.05 0.25 $M99"
  [plain+dp0]="--no-patch-whitening --global-scale 0.25 1 --local-scale 0.05 0.25 $M99"
  [plain+crops]="--no-patch-whitening --drop-path 0.1 $M99"
  [lr4e-3]="$PLAIN --lr 4e-3"
  [local2]="$PLAIN --local-crops 2"
  [lr4e-3-local2]="$PLAIN --lr 4e-3 --local-crops 2"
  [muon]="$PLAIN --optimizer muon"
  [wsd]="$PLAIN --lr-schedule wsd"
)
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(cifar10-cpu m0.99 m0.95 m0.99+lr4e-3 m0.99+wsd m0.99+batch32 cifar10-cpu+wsd cifar10-cpu+koleo0.3
                             cifar10-cpu+muon cifar10-cpu+tau0.03 cifar10-cpu+lambda0.5
                             plain plain+whitening plain+dp0 plain+crops lr4e-3 local2 lr4e-3-local2 muon wsd)
for row in "${rows[@]}"; do
  name=${row%%:*}; seed=0; [[ $row == *:* ]] && seed=${row##*:}
  [ -v "FLAGS[$name]" ] || { echo "unknown row $name; expected one of ${!FLAGS[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  python train.py --budget 10m --seed "$seed" --no-resume --output-dir "runs/ablate10/$name-s$seed" ${FLAGS[$name]}
done
