#!/usr/bin/env bash
# check_embedding.sh BUILD_DIR EXAMPLE_DIR MPIEXEC
# Installs the built Loom into a temporary prefix, builds the example project
# against the installed package with find_package(Loom), and runs it on 2 ranks.
set -euo pipefail
build=$1 example=$2 mpiexec=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$example" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build" -j2
out=$("$mpiexec" --oversubscribe -np 2 "$work/build/embed_allgather")
echo "$out"
[ "$(grep -c 'all_gather ok' <<<"$out")" -eq 2 ]
