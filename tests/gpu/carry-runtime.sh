#!/usr/bin/env bash
# carry-runtime.sh: what spar needs to build and run on a host that has a C compiler,
# CMake (and nvcc) but no MPI and no way to install packages, such as a lent GPU machine:
# Debian 12's Open MPI, UCX, PMIx, protobuf-c, libyaml, cmocka and pkgconf, unpacked into
# one folder that travels with the source tree.
#
#   bash tests/gpu/carry-runtime.sh [DIR]      on a Debian 12 machine with apt (default
#                                              DIR: .runtime, ignored by git)
#   source DIR/env.sh                          then, on the other host:
#   cmake -S . -B build && cmake --build build -j && ctest --test-dir build -L gpu
#
# env.sh puts DIR first in PATH and LD_LIBRARY_PATH, points pkg-config at DIR's .pc files
# (with DIR as their sysroot), and tells Open MPI (OPAL_PREFIX, OPAL_SYSCONFDIR) and PMIx
# (PMIX_PREFIX and its component path) where they now live. The folder is about 45 MiB. OpenBLAS is left
# out (such a build uses the blocked CPU kernels). The host's glibc must be at least
# Debian 12's (2.36). tests/gpu/test_carried_runtime.sh checks the recipe here, with the
# system's own copies hidden.
# Exit codes: 0 ok, 1 failure, 77 this machine cannot do it (no apt-get or dpkg-deb, or
# the packages cannot be downloaded).
set -euo pipefail

dir="${1:-.runtime}"
packages=(openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev libucx0 libpmix2 libhwloc15
    libevent-core-2.1-7 libevent-pthreads-2.1-7 libnuma1 libfabric1 libibverbs1 librdmacm1
    libpsm2-2 libpsm-infinipath1 libprotobuf-c1 libprotobuf-c-dev protobuf-c-compiler
    libprotoc32 libprotobuf32 libyaml-0-2 libyaml-dev libcmocka0 libcmocka-dev pkgconf
    pkgconf-bin libpkgconf3)

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "carry-runtime.sh: cannot: no $tool here" >&2; exit 77; }
done
mkdir -p "$dir/debs" "$dir/root"
dir="$(cd "$dir" && pwd)"
if ! (cd "$dir/debs" && apt-get download "${packages[@]}" >/dev/null 2>&1); then
    echo "carry-runtime.sh: cannot: apt-get download failed (no Debian 12 repository?)" >&2
    exit 77
fi
for deb in "$dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dir/root"
done
rm -rf "$dir/debs"
# The names that Debian's alternatives would have made.
ln -sf orterun "$dir/root/usr/bin/mpirun"
ln -sf orterun "$dir/root/usr/bin/mpiexec"
ln -sf opal_wrapper "$dir/root/usr/bin/mpicc"

cat >"$dir/env.sh" <<'EOF'
# env.sh: use the carried runtime (see tests/gpu/carry-runtime.sh). Source it.
R="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/root"
L="$R/usr/lib/x86_64-linux-gnu"
export OPAL_PREFIX="$R/usr" OPAL_SYSCONFDIR="$R/etc/openmpi"
export PMIX_PREFIX="$L/pmix2" PMIX_MCA_mca_base_component_path="$L/pmix2/lib/pmix"
export PATH="$R/usr/bin:$PATH"
export LD_LIBRARY_PATH="$L:$L/openmpi/lib:$L/pmix2/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PKG_CONFIG_LIBDIR="$L/pkgconfig:$R/usr/share/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$R"
export CMAKE_PREFIX_PATH="$R/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export CMAKE_INCLUDE_PATH="$R/usr/include" CMAKE_LIBRARY_PATH="$L"
# components for networks this host lacks (verbs, psm, ofi) would only print load errors
export OMPI_MCA_mca_base_component_show_load_errors=0
EOF
echo "carry-runtime.sh: $(du -sh "$dir" | cut -f1) in $dir; source $dir/env.sh to use it"
