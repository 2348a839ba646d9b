#!/usr/bin/env bash
# launch/device-check.sh [OUT_DIR]
# The GPU check, for a machine with a CUDA GPU and PyTorch (libtorch with
# CUDA) but possibly no MPI, protobuf, GoogleTest or network:
#   1. unpacks the build dependencies carried in .deps/debs
#      (launch/fetch-build-debs.sh, run on a Debian machine) into .deps/root
#      when the machine lacks them;
#   2. configures Loom against PyTorch's libtorch with LOOM_WITH_CUDA and
#      LOOM_WITH_NCCL on, and builds it;
#   3. runs the tests on the GPU: the operators and every tiny preset on CUDA
#      against the CPU in float64 (OnCuda.*, *PresetOnCudaMatchesTheCpu*), the
#      NCCL communicator at one rank; with LOOM_DEVICE_CHECK_CTEST=1 also the
#      CPU suite through CTest (its MPI tests need the carried OpenMPI);
#   4. runs loom-device-bench on the GPU in bf16 and float32: chunked linear
#      attention and blockwise softmax attention TFLOP/s next to the same-run
#      matmul TFLOP/s, and a tiny model's tokens/s;
#   5. times PyTorch's fused causal attention at the same shape for comparison.
# Everything goes to OUT_DIR (default results/device-check): logs, JUnit XML,
# JSON, and summary.txt. Exit code: 0 when the build and GPU tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-results/device-check}")
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
started=$(date +%s)
jobs=$(nproc)

# 1. Dependencies.
prefix=$PWD/.deps/root
if ! command -v mpicxx > /dev/null || ! command -v protoc > /dev/null; then
  if ls .deps/debs/*.deb > /dev/null 2>&1; then
    rm -rf "$prefix" && mkdir -p "$prefix"
    for deb in .deps/debs/*.deb; do
      if command -v dpkg-deb > /dev/null; then dpkg-deb -x "$deb" "$prefix"
      else (tmp=$(mktemp -d) && cd "$tmp" && ar x "$OLDPWD/$deb" && tar -xf data.tar.* -C "$prefix" && rm -rf "$tmp"); fi
    done
    lib=$prefix/usr/lib/x86_64-linux-gnu
    export PATH=$prefix/usr/bin:$PATH
    export LD_LIBRARY_PATH=$lib:$lib/openmpi/lib:${LD_LIBRARY_PATH:-}
    export PKG_CONFIG_PATH=$lib/pkgconfig:$prefix/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}
    export OPAL_PREFIX=$prefix/usr  # relocated OpenMPI finds its components here
    export CMAKE_PREFIX_PATH=$prefix/usr:${CMAKE_PREFIX_PATH:-}
    # The .pc files say prefix=/usr: point them at the unpacked tree.
    find "$prefix" -name '*.pc' -exec sed -i "s|^prefix=/usr\$|prefix=$prefix/usr|" {} +
    # The mpirun/mpicxx names are alternatives that dpkg would create.
    for n in mpirun mpiexec mpicxx mpicc mpic++; do ln -sf "$n.openmpi" "$prefix/usr/bin/$n"; done
    note "dependencies: unpacked $(ls .deps/debs/*.deb | wc -l) carried packages into $prefix"
  else
    note "dependencies: MPI or protoc missing and no .deps/debs carried (run launch/fetch-build-debs.sh where apt works)"
  fi
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# 2. Configure and build against PyTorch's libtorch.
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)') || { note "FAIL: no PyTorch"; exit 1; }
note "torch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
# NCCL: the CUDA toolkit's, else the one PyTorch's wheels bring (nvidia-nccl-*: headers and libnccl.so.2).
nccl_args=()
if [ ! -f /usr/local/cuda/include/nccl.h ]; then
  site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2> /dev/null)
  nccl_h=$(find $site -path '*nvidia*' -name nccl.h 2> /dev/null | head -1)
  nccl_so=$(find $site -path '*nvidia*' -name 'libnccl.so*' 2> /dev/null | head -1)
  if [ -n "$nccl_h" ] && [ -n "$nccl_so" ]; then
    nccl_args=(-DLOOM_NCCL_INCLUDE_DIR="$(dirname "$nccl_h")" -DLOOM_NCCL_LIBRARY="$nccl_so")
    export LD_LIBRARY_PATH=$(dirname "$nccl_so"):${LD_LIBRARY_PATH:-}
    note "nccl: $nccl_so (PyTorch's wheel)"
  fi
fi
# The c10d backend has not yet been compiled against PyTorch 2.x: opt in with LOOM_DEVICE_CHECK_C10D=ON
# (a compile error there would otherwise stop every GPU test).
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
if ! cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
     -DCMAKE_PREFIX_PATH="$torch_prefix;${CMAKE_PREFIX_PATH:-}" \
     -DLOOM_WITH_CUDA=ON -DLOOM_WITH_NCCL=ON -DLOOM_INSTALL=OFF "${nccl_args[@]}" \
     -DLOOM_WITH_C10D="${LOOM_DEVICE_CHECK_C10D:-OFF}" \
     > "$out/configure.log" 2>&1; then
  note "FAIL: configure (see configure.log)"; tail -20 "$out/configure.log"; exit 1
fi
note "configure: ok in $(( $(date +%s) - started )) s"
# Only what the check runs; keep going past a failing file so one log shows every error.
targets=(loom_tests loom-device-bench loom-train)
keep_going=(-k)
[ ${#generator[@]} -gt 0 ] && keep_going=(-k 0)
if ! cmake --build build-gpu -j"$jobs" --target "${targets[@]}" -- "${keep_going[@]}" > "$out/build.log" 2>&1; then
  note "FAIL: build (see build.log)"; grep -E -m20 -A3 "error" "$out/build.log" | tee -a "$summary"; exit 1
fi
note "build: ok in $(( $(date +%s) - started )) s"

# 3. Tests on the GPU (one rank: the MPI singleton), then the CPU suite.
status=0
timeout 200 ./build-gpu/tests/loom_tests \
  --gtest_filter='OnCuda.*:*PresetOnCudaMatchesTheCpu*:*DeviceAgnostic*:NcclCommunicator*:*MixedPrecision*' \
  > "$out/gpu_tests.log" 2>&1 || status=1
note "gpu tests ($(( $(date +%s) - started )) s): $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/gpu_tests.log" | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ')"
grep -E '^\[  FAILED  \] [A-Za-z]' "$out/gpu_tests.log" | sed 's/\x1b\[[0-9;]*m//g' | sort -u | tee -a "$summary"
if [ "${LOOM_DEVICE_CHECK_CTEST:-0}" != 1 ]; then
  note "ctest: skipped (the CPU suite runs in CI; LOOM_DEVICE_CHECK_CTEST=1 runs it here too)"
elif command -v mpirun > /dev/null; then
  (cd build-gpu && timeout 420 ctest -j"$jobs" -LE embedding --output-junit "$out/ctest.xml" > "$out/ctest.log" 2>&1)
  note "ctest (CPU suite, MPI): $(grep -E 'tests passed|tests failed' "$out/ctest.log")"
else
  note "ctest: skipped, no mpirun"
fi

# 4. Benchmarks on the GPU.
for dtype in bfloat16 float32; do
  timeout 120 ./build-gpu/benchmarks/loom-device-bench --device cuda --dtype "$dtype" --matmul-n 8192 --seq 16384 \
    --heads 16 --dim 128 --block 128 --batch 2 --model-seq 4096 --model-batch 8 --reps 10 \
    --json "$out/bench_$dtype.json" > "$out/bench_$dtype.log" 2>&1 || status=1
  sed "s/^/bench $dtype: /" "$out/bench_$dtype.log" | tee -a "$summary"
done
# 5. The bar: PyTorch's fused causal attention at the same shape (bf16).
timeout 60 python3 benchmarks/sdpa_reference.py --batch 2 --heads 16 --seq 16384 --dim 128 2>&1 | tee -a "$summary"
note "device-check: $(( $(date +%s) - started )) s, exit $status"
exit $status
