#!/usr/bin/env bash
# test_carried_runtime.sh: the recipe of carry-runtime.sh, checked on this machine as a
# host without MPI would see it. In a private mount namespace the system's Open MPI,
# PMIx, protobuf-c, libyaml and cmocka (libraries, headers, tools and data) are replaced
# by empty files and folders; spar is then configured, built and run on 2 ranks with
# verification using only the carried runtime. Root only (mount namespaces); skipped (77)
# with the reason where that, or downloading the packages, is impossible.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/../.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "skip: needs root (a private mount namespace)"; exit 77; }
command -v unshare >/dev/null || { echo "skip: no unshare"; exit 77; }
tmp="$(mktemp -d "${TMPDIR:-/tmp}/spar-carry.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

bash "$here/carry-runtime.sh" "$tmp/rt"
rc=$?
[ "$rc" -eq 0 ] || { [ "$rc" -eq 77 ] && echo "skip: the packages cannot be fetched here"; exit "$rc"; }

cat >"$tmp/inside.sh" <<'EOF'
set -eu
tmp="$1" top="$2"
empty="$(mktemp -d)"
: >"$tmp/empty-file"
lib=/usr/lib/x86_64-linux-gnu
for d in $lib/openmpi $lib/pmix2 /usr/share/openmpi /usr/share/pmix /etc/openmpi \
         /usr/include/protobuf-c /usr/include/x86_64-linux-gnu/openmpi; do
    [ -d "$d" ] && mount --bind "$empty" "$d"
done
for f in $lib/libmpi.so.40.* $lib/libopen-pal.so.40.* $lib/libopen-rte.so.40.* \
         $lib/libprotobuf-c.so.1.* $lib/libyaml-0.so.2.* $lib/libcmocka.so.0.* \
         /usr/bin/orterun /usr/bin/orted /usr/bin/opal_wrapper /usr/bin/protoc-c \
         /usr/include/yaml.h /usr/include/cmocka.h $lib/pkgconfig/ompi*.pc \
         $lib/pkgconfig/yaml-0.1.pc $lib/pkgconfig/libprotobuf-c.pc $lib/pkgconfig/cmocka.pc; do
    [ -e "$f" ] && mount --bind "$tmp/empty-file" "$f"
done
. "$tmp/rt/env.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S "$top" -B "$tmp/build" -DSPAR_WITH_CUDA=OFF -DOPENBLAS_LIB=OPENBLAS_LIB-NOTFOUND \
    >"$tmp/configure.log" 2>&1 || { tail -30 "$tmp/configure.log"; exit 1; }
cmake --build "$tmp/build" -j2 --target spar_exe >"$tmp/build.log" 2>&1 ||
    { tail -30 "$tmp/build.log"; exit 1; }
ldd "$tmp/build/spar" | grep -E "libmpi|libprotobuf-c|libyaml"
mpirun -np 2 --oversubscribe "$tmp/build/spar" run --set sequence.length=300 \
    --set attention.heads=4 --set attention.kv_heads=2 --set attention.head_dim=24 \
    --set run.verify=true
EOF
out="$(unshare -m bash "$tmp/inside.sh" "$tmp" "$top" 2>&1)"
rc=$?
echo "$out" | grep -Ev '^#   '
[ "$rc" -eq 0 ] || { echo "FAILED: build or run with the carried runtime (exit $rc)"; exit 1; }
for l in libmpi libprotobuf-c libyaml; do
    echo "$out" | grep -q "$l.* => $tmp/rt/root/" ||
        { echo "FAILED: $l does not come from the carried runtime"; exit 1; }
done
echo "$out" | grep -q '^# verify: passed' || { echo "FAILED: no verified run"; exit 1; }
echo "ok - built and ran on 2 ranks with only the carried runtime ($(du -sh "$tmp/rt" | cut -f1))"
