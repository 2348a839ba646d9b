#!/usr/bin/env bash
# check_embedding.sh BUILD_DIR EXAMPLES_DIR MPIEXEC
# Installs the built Loom into a temporary prefix, builds the example projects
# against the installed package with find_package(Loom), and runs them on 2 ranks.
set -euo pipefail
build=$1 examples=$2 mpiexec=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >/dev/null
# The package puts only <prefix>/include on a consumer's path, pushes no
# compile definitions onto it, and every installed header includes Loom's
# other headers as loom/... (so nothing needs a generic runtime/ or models/ dir).
targets=$(cat "$work"/prefix/lib*/cmake/Loom/LoomTargets.cmake)
includes=$(grep -o 'INTERFACE_INCLUDE_DIRECTORIES "[^"]*"' <<<"$targets")
echo "installed $includes"
[ "$includes" = 'INTERFACE_INCLUDE_DIRECTORIES "${_IMPORT_PREFIX}/include"' ] || { echo "FAIL: include path is not <prefix>/include alone"; exit 1; }
if grep -q 'INTERFACE_COMPILE_DEFINITIONS' <<<"$targets"; then echo "FAIL: the package exports compile definitions"; exit 1; fi
[ -f "$work/prefix/include/loom/runtime/core/build_config.h" ] || { echo "FAIL: build_config.h not installed"; exit 1; }
[ -f "$work/prefix/include/loom/runtime/core/proto/loom.pb.h" ] || { echo "FAIL: loom.pb.h not installed"; exit 1; }
bad=$(grep -rn '#include "' "$work/prefix/include/loom" | grep -v '#include "loom/' || true)
[ -z "$bad" ] || { echo "FAIL: installed headers include non-loom/ paths:"; echo "$bad"; exit 1; }
ls "$work/prefix/include"
[ "$(ls "$work/prefix/include")" = loom ] || { echo "FAIL: something besides loom/ under <prefix>/include"; exit 1; }
# Both examples at once, one core each: configuring (find_package(Torch)) and
# compiling one file each are serial work, so this halves the test's time.
pids=()
for example in embed_allgather custom_trainer; do
  (cmake -S "$examples/$example" -B "$work/$example" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release &&
     cmake --build "$work/$example" -j1) > "$work/$example.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in 0 1; do wait "${pids[$i]}" || failed=1; done
if [ $failed -ne 0 ]; then cat "$work"/*.log; echo "FAIL: an example did not configure or build"; exit 1; fi
out=$("$mpiexec" --oversubscribe -np 2 "$work/embed_allgather/embed_allgather")
echo "$out"
[ "$(grep -c 'all_gather ok' <<<"$out")" -eq 2 ]
(cd "$work" && "$mpiexec" --oversubscribe -np 2 "$work/custom_trainer/custom_trainer")
