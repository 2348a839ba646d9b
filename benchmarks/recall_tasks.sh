#!/usr/bin/env bash
# Recall benchmark (not a test): trains a tiny BASED on MQAR and a tiny Titans
# on S-NIAH pass-key at 2K tokens with 2 sequence-parallel ranks, and prints
# the accuracy each reaches and the wall time. Override steps with
#   bash benchmarks/recall_tasks.sh --set train.steps=300
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for config in mqar-based sniah-titans; do
  rm -rf "results/$config"
  start=$(date +%s)
  mpirun -np 2 --oversubscribe build/launch/loom-train --config "benchmarks/configs/$config.pbtxt" "$@" \
    | grep -E "accuracy|final validation|step [0-9]+/"
  echo "$config: wall time $(( $(date +%s) - start )) s"
done
