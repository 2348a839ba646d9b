#!/usr/bin/env bash
# The README's first command: installs what is missing, builds Loom, prepares
# the default corpus (GCIDE dictionary entries, byte tokens) and runs the main
# job: a tiny BASED/Titans hybrid trained with 2 sequence-parallel ranks, then
# evaluated, checkpointed, and asked for a short greedy continuation.
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
mpirun -np 2 --oversubscribe build/launch/loom-train --config configs/demo.pbtxt --overwrite \
  --generate 'Abjure \Ab*jure"\, v. t.' --max-new-tokens 80 "$@"
echo "metrics: checkpoints/demo/metrics.jsonl"
