#!/usr/bin/env bash
# Regenerates the key table in configs/README.md from the program's key table.
# Usage: bash configs/update-schema.sh [path/to/spar]   (default: build/spar)
set -euo pipefail
cd "$(dirname "$0")/.."
spar="${1:-build/spar}"
table=$("$spar" config schema)
awk -v table="$table" '
  /<!-- schema:begin -->/ { print; print table; skip = 1; next }
  /<!-- schema:end -->/   { skip = 0 }
  !skip { print }
' configs/README.md > configs/README.md.new
mv configs/README.md.new configs/README.md
