#!/usr/bin/env bash
# The README's first command: installs what is missing, builds Loom, prepares
# the default corpus (GCIDE dictionary entries, byte tokens) and runs the main
# job: a tiny BASED/Titans hybrid trained on rows of 8,192 tokens with 2
# sequence-parallel ranks, then evaluated (validation loss, loss by position
# in the row, plotted to checkpoints/demo/position-loss.png, and needle
# retrieval at 1x, 2x and 4x the training length), checkpointed, and asked for
# a short greedy continuation. Arguments go to loom-train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install-deps.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j2
# One document per dictionary entry (the .index beside the .dict.dz gives the
# entries); a missing or unreadable token file, or one from before document
# indexes (version 1), is made anew.
if ! info=$(build/launch/loom-data info data/gcide.tok 2>/dev/null) || grep -q "no document index" <<<"$info"; then
  mkdir -p data
  build/launch/loom-data prepare --input /usr/share/dictd/gcide.dict.dz --output data/gcide.tok
fi
# --overwrite: a previous demo's checkpoints are moved aside into
# checkpoints/demo/superseded-<time>/, never deleted.
# --position-loss-rows / --sniah-lengths: the long-context evaluations after
# training (README, "The main job", says what each number means).
mpirun -np 2 --oversubscribe build/launch/loom-train --config configs/demo.pbtxt --overwrite \
  --position-loss-rows 16 --sniah-lengths 8192,16384,32768 --sniah-examples 8 \
  --generate 'Abjure \Ab*jure"\, v. t.' --max-new-tokens 80 "$@"
bash launch/plot-position-loss.sh checkpoints/demo/metrics.jsonl checkpoints/demo/position-loss.png
echo "metrics: checkpoints/demo/metrics.jsonl"
