#!/usr/bin/env bash
# bench_methods.sh: the four methods across test hosts (network namespaces) at 1 and
# 10 Gbit/s per link, P=2 and P=4: the table of the README's "Several hosts" section.
# Root only. Usage: bash tests/netns/bench_methods.sh [RESULTS.jsonl]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/../.." && pwd)"
spar="${SPAR:-$top/build/spar}"
results="${1:-bench-netns.jsonl}"
trap 'bash "$here/hosts.sh" down >/dev/null 2>&1 || true' EXIT
for rate in 1gbit 10gbit; do
    bash "$here/hosts.sh" up 4 --rate "$rate" >/dev/null
    for cfg in methods methods_linear; do
        for np in 2 4; do
            echo "# rate=$rate P=$np $cfg"
            bash "$here/hosts.sh" run "$np" -- "$spar" bench "$top/configs/bench/$cfg.yaml" \
                --set output.results="$results" --set bench.repeats=3 --set run.resume=false |
                grep -Ev '^#   |^# point'
        done
    done
    bash "$here/hosts.sh" down >/dev/null
done
