#!/usr/bin/env bash
# Installs the dependencies, builds Loom and runs the main job on the default
# configuration with 2 ranks. This is the README's first command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install-deps.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j2
mpirun -np 2 --oversubscribe build/launch/loom-train --config configs/demo.pbtxt "$@"
