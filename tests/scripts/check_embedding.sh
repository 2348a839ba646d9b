#!/usr/bin/env bash
# check_embedding.sh BUILD_DIR EXAMPLES_DIR MPIEXEC
# Installs the built Loom into a temporary prefix, builds the example projects
# against the installed package with find_package(Loom), and runs them on 2 ranks.
set -euo pipefail
build=$1 examples=$2 mpiexec=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >/dev/null
for example in embed_allgather custom_trainer; do
  cmake -S "$examples/$example" -B "$work/$example" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$work/$example" -j2
done
out=$("$mpiexec" --oversubscribe -np 2 "$work/embed_allgather/embed_allgather")
echo "$out"
[ "$(grep -c 'all_gather ok' <<<"$out")" -eq 2 ]
(cd "$work" && "$mpiexec" --oversubscribe -np 2 "$work/custom_trainer/custom_trainer")
