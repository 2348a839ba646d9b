#!/usr/bin/env bash
# check_loom_bench.sh LOOM_BENCH MPIEXEC SWEEP: runs a tiny sweep at 2 ranks and
# checks its outputs: every file written, LASP-2 forward bytes equal to the
# formula and equal at both lengths, ring bytes doubling with the length, and
# with packed documents LASP-2 bytes independent of the number of documents.
set -uo pipefail
bench=$1 mpiexec=$2 sweep=$3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$mpiexec" --oversubscribe -np 2 "$bench" --sweep "$sweep" --out "$out" || { echo "FAIL: loom-bench exited $?"; exit 1; }
for f in results.jsonl results.csv projections.csv limits.csv report.txt; do
  [ -s "$out/$f" ] || { echo "FAIL: $f missing"; exit 1; }
done
grep -q "paper: 36.6%" "$out/report.txt" || { echo "FAIL: no projection next to the paper"; exit 1; }
grep -q "BYTES != FORMULA" "$out/report.txt" && { echo "FAIL: bytes differ from a formula"; exit 1; }
# Columns by name: the CSV may gain columns.
col() { head -1 "$out/results.csv" | tr , '\n' | grep -nx "$1" | cut -d: -f1; }
fwd=$(col fwd_bytes) docs=$(col doc_mean)
[ -n "$fwd" ] && [ -n "$docs" ] || { echo "FAIL: results.csv lacks fwd_bytes or doc_mean"; exit 1; }
lasp=$(awk -F, -v f="$fwd" -v d="$docs" '$2 == "linear_layer" && $3 == "lasp2" && $d == 0 { print $f }' "$out/results.csv" | sort -u | wc -l)
[ "$lasp" = 1 ] || { echo "FAIL: LASP-2 bytes change with the length"; exit 1; }
packed=$(awk -F, -v f="$fwd" -v d="$docs" '$2 == "linear_layer" && $3 == "lasp2" && $d > 0 { print $f }' "$out/results.csv" | sort -u)
[ "$(echo "$packed" | wc -l)" = 1 ] && [ -n "$packed" ] ||
  { echo "FAIL: packed LASP-2 bytes change with the length or the number of documents: $packed"; exit 1; }
grep -q "packed documents vs flat rows" "$out/report.txt" || { echo "FAIL: no packed-vs-flat section"; exit 1; }
ring=($(awk -F, -v f="$fwd" -v d="$docs" '$2 == "softmax_layer" && $3 == "ring_zigzag" && $d == 0 { print $f }' "$out/results.csv"))
[ "${ring[1]}" = $(( 2 * ring[0] )) ] || { echo "FAIL: ring bytes ${ring[*]} do not double with the length"; exit 1; }
grep -q "^lasp2," "$out/limits.csv" || { echo "FAIL: no limits study"; exit 1; }
cat "$out/report.txt"
echo "PASS"
