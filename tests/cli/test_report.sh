#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_report.sh: `spar report` on a recorded sample (tests/data/report-sample.jsonl:
# twelve runs of ring and allgather at N=1024..4096 on 2 and 4 ranks, one interrupted
# record, and a torn last line): the table, --group-by, --csv, and plots that gnuplot
# wrote (a well-formed SVG, a PNG), and a clear error where gnuplot is missing.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

SAMPLE="$SPAR_SOURCE_DIR/tests/data/report-sample.jsonl"

t_table() {
    expect_exit 0 0 '^# 13 record\(s\) from .*; 1 line\(s\) are not records and were skipped \(the first: line 14\)$' -- \
        report "$SAMPLE"
    grep -Eq '^record +name +method +type +causal +job +P +N +H +G +d +thr +fwd_ms +fwd_GFLOP/s' "$OUT" ||
        { show_output; fail "no header"; }
    grep -Eq '^run +sample +ring +softmax +true +- +2 +1024 +4 +2 +32 +1 +9\.407 +28\.56 +- +- +0\.250 +23\.74 +- +1\.36e-07$' "$OUT" ||
        { show_output; fail "the ring P=2 N=1024 row is wrong"; }
    grep -Eq '^run +sample +allgather +softmax +true +- +4 +4096 .* 1\.500 ' "$OUT" ||
        { show_output; fail "the allgather P=4 N=4096 row is wrong"; }
    grep -Eq '^interrupted +sample +allgather .* 8192 ' "$OUT" || { show_output; fail "no interrupted row"; }
    [ "$(grep -c '^run ' "$OUT")" -eq 12 ] || { show_output; fail "expected 12 run rows"; }
}

t_group_by() {
    expect_exit 0 0 '^ +n +record' -- report "$SAMPLE" --group-by parallel.method,P
    grep -Eq '^ +3 +run +sample +ring +softmax +true +- +2 +\* +4 +2 +32 +1 +14\.99 +71\.67 ' "$OUT" ||
        { show_output; fail "ring P=2: count 3, N differs (*), median 14.99 ms"; }
    [ "$(grep -Ec '^ +3 +run ' "$OUT")" -eq 4 ] || { show_output; fail "expected 4 groups of 3"; }
    expect_exit 2 0 "--group-by column 'speed' \(allowed: record name method" -- \
        report "$SAMPLE" --group-by method,speed
}

t_csv() {
    expect_exit 0 0 '^record,name,method,type,causal,job,P,N,H,G,d,thr,fwd_ms,' -- report "$SAMPLE" --csv
    "$PYTHON3" - "$OUT" <<'EOF' || fail "CSV does not parse into 13 rows of 20 fields"
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
assert len(rows) == 14 and all(len(r) == 20 for r in rows), [len(r) for r in rows]
assert rows[1][2] == "ring" and rows[1][7] == "1024" and rows[1][12] == "9.407", rows[1]
EOF
}

t_plots() {
    command -v gnuplot >/dev/null || { echo "skip: gnuplot not installed"; return 0; }
    expect_exit 0 0 "^# plot: $TMP/r\.svg$" -- report "$SAMPLE" --plot "$TMP/r.svg"
    "$PYTHON3" - "$TMP/r.svg" <<'EOF' || fail "not a well-formed SVG with the four panels"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
assert root.tag.endswith("svg"), root.tag
text = " ".join("".join(t.itertext()) for t in root.iter() if t.tag.endswith("text"))
for want in ["forward time", "forward throughput", "scaling with ranks", "bytes sent per rank",
             "ring P=2", "allgather N=4096"]:
    assert want in text, want
EOF
    expect_exit 0 0 "^# plot: $TMP/r\.png$" -- report "$SAMPLE" --plot "$TMP/r.png" --group-by method
    [ "$(head -c 8 "$TMP/r.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] ||
        fail "r.png is not a PNG"
    [ "$(stat -c %s "$TMP/r.png")" -gt 10000 ] || fail "r.png is too small to hold the plots"
    expect_exit 2 0 "--plot '.*r\.pdf' \(allowed: a file ending in \.svg or \.png\)" -- \
        report "$SAMPLE" --plot "$TMP/r.pdf"
}

t_no_gnuplot() {
    mkdir -p "$TMP/empty-path" # a PATH without gnuplot (nor anything else)
    LAST_COMMAND="PATH=$TMP/empty-path spar report SAMPLE --plot x.svg"
    PATH="$TMP/empty-path" "$SPAR" report "$SAMPLE" --plot "$TMP/x.svg" >"$OUT" 2>&1
    local rc=$?
    [ "$rc" -eq 1 ] || { show_output; fail "exit $rc, expected 1"; }
    grep -q 'gnuplot is not installed, so no plot was drawn (apt-get install gnuplot-nox)' "$OUT" ||
        { show_output; fail "no clear message"; }
    grep -Eq '^run +sample +ring ' "$OUT" || { show_output; fail "the table should still be printed"; }
}

t_bad_files() {
    expect_exit 2 0 "spar report: cannot open '.*nothing\.jsonl'" -- report "$TMP/nothing.jsonl"
    expect_exit 2 0 'a results FILE\.jsonl is required' -- report
}

t_generate_records() {
    local res="$TMP/gen.jsonl"
    expect_exit 0 0 '^local ' -- run --set run.mode=generate --set attention.heads=2 \
        --set attention.head_dim=8 --set model.layers=1 --set model.vocab=20 \
        --set workload.batch=2 --set workload.prompt_lengths=3,5 --set workload.generate=4 \
        --set output.results="$res"
    expect_exit 0 0 '^record +name +method +split +job +prompts +ctx +P +K +B +gen +layers +tok/s +p50_ms' -- \
        report "$res"
    grep -Eq '^generate +- +local +- +- +3,5 +- +1 +0 +2 +4 +1 ' "$OUT" || { show_output; fail "no generate row"; }
    command -v gnuplot >/dev/null || return 0
    expect_exit 0 0 "^# plot: $TMP/g\\.svg$" -- report "$res" --plot "$TMP/g.svg"
    grep -q 'decode throughput' "$TMP/g.svg" || fail "the generation plot lacks its panels"
}

case_run "report: one row per record, torn lines counted" t_table
case_run "report --group-by: counts, medians, '*' for differing settings" t_group_by
case_run "report --csv parses as CSV" t_csv
case_run "report --plot: SVG and PNG written by gnuplot" t_plots
case_run "report --plot without gnuplot: clear error, table kept" t_no_gnuplot
case_run "report: missing file, missing argument" t_bad_files
case_run "report: generation records get their own columns" t_generate_records
finish
