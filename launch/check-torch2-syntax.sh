#!/usr/bin/env bash
# launch/check-torch2-syntax.sh [--fetch] [-j N] [-o OUT_DIR] TORCH2_DIR [FILE.cc ...]
# Compile-checks Loom against the headers of a libtorch 2.x on a machine that has only
# Debian's libtorch 1.13 (CPU), so that an API difference shows here and not on a GPU
# machine. Every Loom .cc (or the FILEs given) goes through `g++ -std=c++17 -fsyntax-only`
# with the build configured as the GPU check configures it: LOOM_WITH_CUDA, LOOM_WITH_NCCL,
# LOOM_WITH_C10D and LOOM_FUSED_ATTENTION on (build_config.h generated with those answers),
# the CUDA headers from /usr/local/cuda/include (or $CUDA_INCLUDE).
#
# TORCH2_DIR holds the 2.x headers: a libtorch-dev package unpacked there (TORCH2_DIR/usr/include)
# or a libtorch zip (TORCH2_DIR/include). --fetch fills an empty TORCH2_DIR with Debian's
# libtorch-dev from the next Debian release (2.6 in trixie), downloaded with apt from this
# machine's own Debian mirror into a private apt state (the system's apt is not touched).
# Keep TORCH2_DIR outside the repository. The configure-time headers a -dev package lacks for
# CUDA (ATen/cuda/CUDAConfig.h, c10/cuda/impl/cuda_cmake_macros.h) are written, filled by hand,
# into an overlay directory in OUT_DIR, never into TORCH2_DIR.
#
# What it covers: every preprocessor branch that the GPU build compiles (the CUDA, NCCL, c10d
# and fused-attention code) parsed and type-checked against the 2.x declarations, templates
# instantiated as far as -fsyntax-only goes. What it does not: linking (a symbol declared in
# the headers but missing from the 2.x libraries), code generation, anything that differs
# between the 2.x headers here and the libtorch version on the GPU machine, and runtime.
# A 1.13 header picked up from /usr/include because 2.x lacks it counts as a failure.
#
# Output: OUT_DIR (default results/torch2-syntax) gets one .log per file, failed.txt, and
# summary.txt; exit 0 when every file compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
fetch=0
jobs=$(nproc)
out=results/torch2-syntax
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch) fetch=1; shift ;;
    -j) jobs=$2; shift 2 ;;
    -o) out=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    -*) echo "check-torch2-syntax: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--fetch] [-j N] [-o OUT_DIR] TORCH2_DIR [FILE.cc ...]" >&2; exit 2; }
torch_dir=$(realpath -m "$1"); shift
out=$(realpath -m "$out")
case "$torch_dir/" in "$repo/"*) echo "check-torch2-syntax: keep TORCH2_DIR outside the repository ($torch_dir)" >&2; exit 2 ;; esac

# 1. The 2.x headers.
if [ $fetch = 1 ] && [ ! -f "$torch_dir/usr/include/ATen/ATen.h" ]; then
  apt_dir=$torch_dir/apt
  mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial}
  : > "$apt_dir/status"
  # This machine's Debian mirror, with the suite that carries libtorch 2.x.
  mirror=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2> /dev/null \
           | grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//')
  [ -n "$mirror" ] || { echo "check-torch2-syntax: no Debian mirror in /etc/apt" >&2; exit 1; }
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror ${TORCH2_SUITE:-trixie} main" \
    > "$apt_dir/sources.list"
  apt_opts=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o Dir::State::Lists="$apt_dir/lists" -o Dir::State::Status="$apt_dir/status"
            -o Dir::Cache="$apt_dir/cache" -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" -q update > "$apt_dir/update.log" 2>&1 || { echo "apt-get update failed (see $apt_dir/update.log)" >&2; exit 1; }
  (cd "$apt_dir/cache" && apt-get "${apt_opts[@]}" -q download libtorch-dev) > "$apt_dir/download.log" 2>&1 \
    || { echo "apt-get download libtorch-dev failed (see $apt_dir/download.log)" >&2; exit 1; }
  dpkg-deb -x "$(ls "$apt_dir"/cache/libtorch-dev_*.deb | head -1)" "$torch_dir"
fi
if [ -f "$torch_dir/usr/include/ATen/ATen.h" ]; then inc=$torch_dir/usr/include
elif [ -f "$torch_dir/include/ATen/ATen.h" ]; then inc=$torch_dir/include
else echo "check-torch2-syntax: no ATen/ATen.h under $torch_dir/usr/include or $torch_dir/include (--fetch fills it)" >&2; exit 1; fi
version=$(sed -n 's/^#define TORCH_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)/\2/p' \
          "$inc/torch/csrc/api/include/torch/version.h" | paste -sd.)
case "$version" in 2.*) ;; *) echo "check-torch2-syntax: $inc has libtorch '$version', not 2.x" >&2; exit 1 ;; esac
cuda_inc=${CUDA_INCLUDE:-/usr/local/cuda/include}
[ -f "$cuda_inc/cuda_runtime_api.h" ] || { echo "check-torch2-syntax: no CUDA headers in $cuda_inc (set CUDA_INCLUDE)" >&2; exit 1; }
[ -f "$cuda_inc/nccl.h" ] || echo "check-torch2-syntax: warning: no nccl.h in $cuda_inc" >&2

# 2. A build tree as CMake would lay it: include/loom links, generated build_config.h and loom.pb.h,
#    and the overlay of configure-time headers.
rm -rf "$out" && mkdir -p "$out"
tree=$out/tree
mkdir -p "$tree/include/loom" "$tree/gen/loom/runtime/core" "$tree/overlay/ATen/cuda" "$tree/overlay/c10/cuda/impl"
for dir in runtime parallel models; do ln -s "$repo/$dir" "$tree/include/loom/$dir"; done
sed -e 's/@PROJECT_VERSION@/0.1.0-torch2-syntax/' \
    -e 's/^#cmakedefine01 \(LOOM_[A-Z0-9_]*\)/#define \1 1/' cmake/build_config.h.in \
    > "$tree/gen/loom/runtime/core/build_config.h"
if grep -q '@\|cmakedefine' "$tree/gen/loom/runtime/core/build_config.h"; then
  echo "check-torch2-syntax: cmake/build_config.h.in has a form this script does not fill" >&2; exit 1
fi
protoc --cpp_out="$tree/gen" -I "$tree/include" "$tree/include/loom/runtime/core/proto/loom.proto" \
  || { echo "check-torch2-syntax: protoc failed" >&2; exit 1; }
[ -f "$inc/ATen/cuda/CUDAConfig.h" ] || cat > "$tree/overlay/ATen/cuda/CUDAConfig.h" << 'EOF'
#pragma once
// Filled by hand for the syntax check (CMake configures it in a PyTorch build with CUDA).
#define AT_CUDNN_ENABLED() 1
#define AT_CUSPARSELT_ENABLED() 0
#define AT_HIPSPARSELT_ENABLED() 0
#define AT_ROCM_ENABLED() 0
#define AT_MAGMA_ENABLED() 0
#define NVCC_FLAGS_EXTRA ""
EOF
[ -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ] || cat > "$tree/overlay/c10/cuda/impl/cuda_cmake_macros.h" << 'EOF'
#pragma once
// Filled by hand for the syntax check (CMake configures it in a PyTorch build with CUDA).
#define C10_CUDA_BUILD_SHARED_LIBS
#define TORCH_CUDA_VERSION_MAJOR 12
#define TORCH_CUDA_VERSION_MINOR 8
#define TORCH_CUDA_VERSION_PATCH 0
#define TORCH_CUDA_VERSION_BUILD 0
EOF

flags=(-std=c++17 -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 "-DLOOM_SOURCE_DIR=\"$repo\""
       -I"$tree/overlay" -I"$tree/include" -I"$tree/gen" -I"$repo" -I"$repo/tests"
       -isystem "$inc" -isystem "$inc/torch/csrc/api/include" -isystem "$cuda_inc")
read -r -a mpi_flags <<< "$(mpicxx --showme:compile 2> /dev/null)"
flags+=("${mpi_flags[@]}")
py_inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2> /dev/null) && flags+=(-isystem "$py_inc")

# 3. One precompiled header (the CMake build's PCH list) so that 100 files parse libtorch once.
cat > "$tree/pch.h" << 'EOF'
#include <ATen/ATen.h>
#include <torch/types.h>
#include <torch/autograd.h>
#include <mpi.h>
#include <string>
#include <vector>
#include <memory>
#include <functional>
#include <unordered_map>
EOF
started=$(date +%s)
if ! g++ "${flags[@]}" -x c++-header "$tree/pch.h" -o "$tree/pch.h.gch" > "$out/pch.log" 2>&1; then
  echo "check-torch2-syntax: the precompiled header (ATen/ATen.h, torch/types.h, torch/autograd.h) fails:" >&2
  head -30 "$out/pch.log" >&2; exit 1
fi

# 4. Every file.
if [ $# -gt 0 ]; then files=("$@"); else mapfile -t files < <(git ls-files '*.cc'); fi
export CHECK_OUT=$out CHECK_TREE=$tree
check_one() {
  local f=$1 log
  log=$CHECK_OUT/$(echo "$f" | tr / _).log
  if ! g++ -fsyntax-only "${@:2}" -include "$CHECK_TREE/pch.h" -MD -MF "$log.d" "$f" > "$log" 2>&1; then
    echo "FAIL $f"; return
  fi
  # A header that 2.x lacks would be found among the 1.13 headers in /usr/include.
  local stale
  stale=$(tr ' \\' '\n\n' < "$log.d" | grep -E '^/usr/include/(ATen|c10|torch|caffe2)/' | head -3 | paste -sd' ')
  rm -f "$log.d"
  if [ -n "$stale" ]; then echo "uses libtorch 1.13 headers: $stale" >> "$log"; echo "FAIL $f"; return; fi
  echo "ok   $f"
}
export -f check_one
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} bash -c 'check_one "$@"' _ {} "${flags[@]}" \
  | sort -k2 > "$out/results.txt"
grep '^FAIL' "$out/results.txt" | awk '{print $2}' > "$out/failed.txt"
n_all=$(wc -l < "$out/results.txt"); n_fail=$(wc -l < "$out/failed.txt")
{
  echo "libtorch $version headers from $inc, CUDA headers from $cuda_inc"
  echo "$((n_all - n_fail)) passed, $n_fail failed ($(( $(date +%s) - started )) s)"
  while read -r f; do
    echo "FAIL $f:"
    grep -m3 -E 'error|uses libtorch 1.13' "$out/$(echo "$f" | tr / _).log" | sed 's/^/    /'
  done < "$out/failed.txt"
} | tee "$out/summary.txt"
[ "$n_fail" = 0 ]
