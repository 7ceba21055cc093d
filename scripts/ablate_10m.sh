#!/bin/bash
# Ten-minute runs of the cifar10-cpu preset against one lever each (docs/cpu_recipe.md, "Ten-minute levers").
# Each is `python train.py --budget 10m --seed S [flags]` into runs/ablate10/NAME-sSEED/ (log.jsonl with kNN
# every 250 steps and the diagnostics, curves.png); one at a time, since each run's steps depend on the CPU
# it has to itself. Then: python plot_run.py --compare knn10.png runs/ablate10/*-s*
# usage: bash scripts/ablate_10m.sh [ROW ...]   (default: every row, seed 0; ROW is NAME or NAME:SEED)
set -e
cd "$(dirname "$0")/.."
declare -A FLAGS=(
  [cifar10-cpu]=""
  [lr4e-3]="--lr 4e-3"
  [local2]="--local-crops 2"
  [lr4e-3-local2]="--lr 4e-3 --local-crops 2"
  [muon]="--optimizer muon"
  [wsd]="--lr-schedule wsd"
)
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(cifar10-cpu lr4e-3 local2 lr4e-3-local2 muon wsd)
for row in "${rows[@]}"; do
  name=${row%%:*}; seed=0; [[ $row == *:* ]] && seed=${row##*:}
  [ -v "FLAGS[$name]" ] || { echo "unknown row $name; expected one of ${!FLAGS[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  python train.py --budget 10m --seed "$seed" --no-resume --output-dir "runs/ablate10/$name-s$seed" ${FLAGS[$name]}
done
