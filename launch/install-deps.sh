#!/usr/bin/env bash
# Installs what Loom needs on Debian bookworm (the CI machines, the Docker
# images and a fresh developer machine all use this one script), and makes sure
# an optimised BLAS is the libblas.so.3 that libtorch resolves to: Debian's
# libtorch links the generic libblas.so.3, 20-40x slower for matrix products.
# libblas-dev gives CMake the libblas.so that the CPU kernels link for their
# direct CBLAS calls and libxsmm-dev the small-matrix kernels they prefer
# (parallel/linear_attention/cpu_blas.h).
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail

packages=(
  build-essential cmake git pkg-config
  libtorch-dev libgloo-dev python3-torch pybind11-dev python3-dev
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler
  libgtest-dev libgmock-dev
  libopenblas0-openmp libblas-dev libxsmm-dev
  libcli11-dev nlohmann-json3-dev
  zlib1g-dev libzstd-dev libsentencepiece-dev
  dict-gcide gnuplot-nox zstd
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Select OpenBLAS (OpenMP build) as libblas.so.3 / liblapack.so.3.
arch_triplet=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for lib in libblas.so.3 liblapack.so.3; do
  alt="$lib-$arch_triplet"
  target="/usr/lib/$arch_triplet/openblas-openmp/$lib"
  if [ -e "$target" ] && update-alternatives --query "$alt" >/dev/null 2>&1; then
    $SUDO update-alternatives --set "$alt" "$target" >/dev/null
  fi
done
resolved=$(readlink -f "/usr/lib/$arch_triplet/libblas.so.3")
case "$resolved" in
  *openblas*) echo "install-deps: libblas.so.3 -> $resolved" ;;
  *) echo "install-deps: libblas.so.3 resolves to $resolved, not OpenBLAS" >&2; exit 1 ;;
esac
