#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_schema.sh: the key table documented in configs/README.md is the one the program
# has (`spar config schema`, pasted verbatim), and every example experiment file is valid.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

: "${SPAR_SOURCE_DIR:?SPAR_SOURCE_DIR must name the source tree}"
CONFIGS="$SPAR_SOURCE_DIR/configs"
README="$CONFIGS/README.md"

t_schema_in_readme() {
    local schema readme
    schema=$("$SPAR" config schema) || fail "spar config schema exited $?"
    [ -n "$schema" ] || fail "spar config schema printed nothing"
    [ -f "$README" ] || fail "$README does not exist; it must embed the key table: regenerate" \
        "it with: bash configs/update-schema.sh"
    readme=$(cat "$README")
    if [[ "$readme" != *"$schema"* ]]; then
        echo "--- spar config schema (expected verbatim in $README):" >&2
        echo "$schema" >&2
        echo "--- of these, lines not found in the README:" >&2
        grep -vxF -f "$README" <<<"$schema" >&2 || echo "(none: the lines are all there, but not as one block)" >&2
        fail "the key table in $README is out of date: regenerate it with" \
            "\`spar config schema\` and paste the output verbatim"
    fi
}

t_schema_is_table() {
    local schema rows keys
    schema=$("$SPAR" config schema) || fail "spar config schema exited $?"
    [ "$(sed -n 1p <<<"$schema")" = "| key | type | default | allowed | meaning |" ] ||
        fail "unexpected header line: $(sed -n 1p <<<"$schema")"
    rows=$(grep -c '^| `' <<<"$schema")
    # shellcheck disable=SC2016 # backquotes are Markdown here
    keys=$(sed -n 's/^| `\([^`]*\)` |.*/\1/p' <<<"$schema" | sort -u | wc -l)
    [ "$rows" -ge 10 ] || fail "only $rows key rows"
    [ "$rows" -eq "$keys" ] || fail "$rows rows but $keys distinct keys"
    # Every row has exactly five cells (a bare '|' inside a cell would add one).
    local bad
    bad=$(sed 's/\\|//g' <<<"$schema" | awk -F'|' 'NF != 7' | head -3)
    [ -z "$bad" ] || fail "rows without exactly 5 cells: $bad"
}

t_configs_check() {
    [ -d "$CONFIGS" ] || fail "$CONFIGS does not exist"
    local files=() f failed=""
    while IFS= read -r -d '' f; do
        files+=("$f")
    done < <(find "$CONFIGS" -type f \( -name '*.yaml' -o -name '*.yml' \) -print0 | sort -z)
    if [ ${#files[@]} -eq 0 ]; then
        echo "# note: no .yaml files under $CONFIGS (nothing to check)" >&2
        return 0
    fi
    # From the source root, as a user would run them (paths in the files are relative).
    cd "$SPAR_SOURCE_DIR" || fail "cannot cd to $SPAR_SOURCE_DIR"
    for f in "${files[@]}"; do
        if ! (expect_exit 0 0 ": ok$" -- config check "$f"); then
            failed="$failed ${f#"$SPAR_SOURCE_DIR"/}"
        fi
    done
    [ -z "$failed" ] || fail "spar config check failed for:$failed"
    echo "# checked ${#files[@]} experiment files" >&2
}

case_run "spar config schema is a well-formed Markdown table" t_schema_is_table
case_run "configs/README.md embeds spar config schema verbatim" t_schema_in_readme
case_run "every .yaml under configs/ passes spar config check" t_configs_check
finish
