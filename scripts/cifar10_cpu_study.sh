#!/usr/bin/env bash
# The README's CPU-budget CIFAR-10 study: ResNet-20 full precision, 1w1a
# without CMIM (weight 0) and 1w1a with CMIM, the same steps for all three,
# on train[:45000] / train[45000:], then the table and plot.
#
#   bash scripts/cifar10_cpu_study.sh [SEEDS...]      (default: seed 0)
#   DATA_DIR=~/data/cifar10.tar.gz bash scripts/cifar10_cpu_study.sh
#
# DATA_DIR becomes --config.data.data_dir; unset, the image folder archive of
# the development machine (../shared/data/cifar10-train.tar.gz) is used when it
# exists, else the config's own data_dir (tfds' default directory).
#
# Runs are resumable: re-running skips finished runs and resumes cut ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/cifar10_cpu}
STEPS=${STEPS:-}  # empty: the config's num_train_steps
seeds=("${@:-0}")
extra=()
[ -n "$STEPS" ] && extra+=("--config.num_train_steps=$STEPS")
SHARED_DATA=../shared/data/cifar10-train.tar.gz
if [ -z "${DATA_DIR:-}" ] && [ -f "$SHARED_DATA" ]; then
  DATA_DIR=$SHARED_DATA
  extra+=("--config.data.source=folder")
fi
[ -n "${DATA_DIR:-}" ] && extra+=("--config.data.data_dir=$DATA_DIR")
for seed in "${seeds[@]}"; do
  for run in fp base cmim; do
    case $run in
      fp)   args=(--config.model.name=resnet20_fp --config.cmim.weight=0) ;;
      base) args=(--config.model.name=resnet20 --config.cmim.weight=0) ;;
      cmim) args=(--config.model.name=resnet20 --config.cmim.weight=3.2) ;;
    esac
    echo "=== $run seed $seed ==="
    JAX_PLATFORMS=cpu "$PY" -m cmim_jax.main --config configs/cifar10.py:study \
      --workdir "$OUT/$run-s$seed" --config.seed="$seed" "${args[@]}" "${extra[@]}"
  done
done
"$PY" scripts/plot_study.py "$OUT" --out docs/cifar10_cpu_study.png
