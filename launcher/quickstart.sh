#!/usr/bin/env bash
# Quickstart: install the Debian packages spar needs (only those missing), build it, and
# run configs/quickstart.yaml on 4 ranks. Usage: bash launcher/quickstart.sh [NP]
set -euo pipefail
cd "$(dirname "$0")/.."
np="${1:-4}"

missing=()
while read -r pkg; do
  [ -n "$pkg" ] || continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < launcher/debian-packages.txt
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
echo "built build/spar; running configs/quickstart.yaml on $np ranks"

# Open MPI refuses root unless told twice; more ranks than cores need --oversubscribe.
[ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun -np "$np" --oversubscribe build/spar run configs/quickstart.yaml
