#!/usr/bin/env bash
# Downloads, on this Debian machine, the .deb files of the build dependencies
# that a GPU machine with PyTorch but without MPI, protobuf, GoogleTest or
# CLI11 (and without network) lacks, into .deps/debs (ignored by git). The
# device tool carries the folder there (carry: [".deps"]) and
# launch/device-check.sh unpacks them into a private prefix.
# The C library and other base packages every Linux machine has are left out:
# the GPU machine's own are used.
set -euo pipefail
cd "$(dirname "$0")/.."
# libzstd1 travels with libzstd-dev (not left to the base): the dev package's
# libzstd.so link names the exact library version it came with.
wanted=(libopenmpi-dev openmpi-bin libprotobuf-dev protobuf-compiler libgtest-dev libgmock-dev libcli11-dev
        nlohmann-json3-dev zlib1g-dev libzstd-dev libzstd1 libsentencepiece-dev pkgconf)
base='^(libc6|libc6-dev|libgcc-s1|libstdc\+\+6|libstdc\+\+-12-dev|gcc-12-base|libcrypt1|zlib1g|debconf|dpkg|perl.*|libperl.*|tar|coreutils|libselinux1|libpcre2-8-0|liblzma5|libbz2-1.0|libtinfo6|libsystemd0|libudev1|libcap2|libgcrypt20|libgpg-error0|liblz4-1|libssl3|libdb5.3|libgdbm.*|libacl1|libattr1|libgmp10|libmd0|libbsd0|libaudit.*|libcap-ng0|sensible-utils|readline-common|libreadline8|linux-libc-dev|libcrypt-dev|libnsl.*|libtirpc.*|rpcsvc-proto|gcc.*|cpp.*|g\+\+.*|binutils.*|libgomp1|libquadmath0|libasan8|libubsan1|libtsan2|liblsan0|libitm1|libatomic1|libcc1-0|libisl23|libmpc3|libmpfr6|libctf.*|libgprofng0|libjansson4|libbinutils|libsframe0|libexpat1|libffi8|python3.*|libpython3.*|libsqlite3-0|libncursesw6|libuuid1|libblkid1|libmount1|libsmartcols1|mount|util-linux.*|init-system-helpers|lsb-base|sysvinit-utils|libpam.*|login|passwd|libsemanage.*|libsepol2|libkrb5.*|libk5crypto3|libkeyutils1|libcom-err2|libgssapi.*)$'
# Compilers and tools that the dependency closure drags in (Fortran for
# OpenMPI's Fortran bindings, LLVM, autotools): the GPU machine builds C++ only.
tools='^(flang.*|libflang.*|libllvm.*|libclang.*|libmlir.*|gfortran.*|libgfortran-.*-dev|libgcc-.*-dev|libasan.*|libtsan.*|autoconf|automake|autotools-dev|libtool|libicu.*|libjs-.*|cdebconf|libdebian-installer.*|libnewt.*|libslang.*|libtextwrap.*|adduser|install-info|debianutils|libc-dev-bin|libfido2.*|libedit2|libcbor.*|libxml2|libz3.*|libcurl.*|libbpf.*|libelf1|openssh-client|libx11.*|libxau.*|libxdmcp.*|libxcb.*|libxext.*|libxnvctrl.*|x11-common|libxml2.*|libevent-dev|libhwloc-dev|libibverbs-dev|libnl-.*-dev|libnuma-dev|libpmix-dev|libltdl-dev)$'
mapfile -t packages < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "${wanted[@]}" | grep -E '^[a-z0-9]' | sed 's/:any$//' | sort -u | grep -Ev "$base" | grep -Ev "$tools")
rm -rf .deps/debs && mkdir -p .deps/debs
(cd .deps/debs && apt-get download "${packages[@]}" > /dev/null)
echo "fetch-build-debs: ${#packages[@]} packages, $(du -sh .deps/debs | cut -f1) in .deps/debs"
