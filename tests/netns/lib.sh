# shellcheck shell=bash
# lib.sh: what the network-namespace tests share (sourced, after HERE is set): skip()
# with exit 77, and the checks that this machine can run them, which also set MPIEXEC and
# SPAR (the environment's, or mpirun and build/spar) and allow mpirun as root.

skip() {
    echo "skip: $*"
    exit 77
}

[ "$(id -u)" -eq 0 ] || skip "needs root for network namespaces (running as uid $(id -u))"
command -v ip >/dev/null 2>&1 || skip "the ip command (iproute2) is not installed"
err=$(ip netns list 2>&1 >/dev/null) || skip "'ip netns' is not available: ${err:-failed}"
MPIEXEC=${MPIEXEC:-$(command -v mpirun || true)}
{ [ -n "$MPIEXEC" ] && command -v "$MPIEXEC" >/dev/null 2>&1; } || skip "mpirun not found (set MPIEXEC)"
SPAR=${SPAR:-$HERE/../../build/spar}
if [ ! -x "$SPAR" ]; then
    echo "error: SPAR must name the spar program (got '$SPAR')"
    exit 1
fi
export MPIEXEC OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
