#!/usr/bin/env bash
# check_loom_bench.sh LOOM_BENCH MPIEXEC SWEEP [GATED_SWEEP]: runs a tiny sweep at
# 2 ranks and checks its outputs: every file written, LASP-2 forward bytes equal
# to the formula and equal at both lengths, ring bytes doubling with the length,
# and with packed documents LASP-2 bytes independent of the number of documents.
# GATED_SWEEP (GLA and Gated DeltaNet layers, head_dim 16, heads 2, batch 1):
# forward bytes per rank equal to the formulas written out here, flat in N and
# in the documents for every LASP method, doubling for the all-gather baseline,
# the same bytes again backward (LASP-2, all-gather), and their projections.
set -uo pipefail
bench=$1 mpiexec=$2 sweep=$3 gated_sweep=${4:-}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$mpiexec" --oversubscribe -np 2 "$bench" --sweep "$sweep" --out "$out" || { echo "FAIL: loom-bench exited $?"; exit 1; }
for f in results.jsonl results.csv projections.csv limits.csv report.txt; do
  [ -s "$out/$f" ] || { echo "FAIL: $f missing"; exit 1; }
done
grep -q "Loom's LASP-2 .* faster than Loom's ring by" "$out/report.txt" || { echo "FAIL: no projection of Loom's methods"; exit 1; }
grep -q "| LASP-2 over LASP-1, 2048K, 64 GPUs (sec. 4.2) | +15.2% |" "$out/report.txt" ||
  { echo "FAIL: no cost model against the LASP-2 paper"; exit 1; }
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
[ -z "$gated_sweep" ] && { echo "PASS"; exit 0; }

gout="$out/gated"
"$mpiexec" --oversubscribe -np 2 "$bench" --sweep "$gated_sweep" --out "$gout" ||
  { echo "FAIL: loom-bench exited $? on $gated_sweep"; exit 1; }
gcol() { head -1 "$gout/results.csv" | tr , '\n' | grep -nx "$1" | cut -d: -f1; }
gfwd=$(gcol fwd_bytes) gform=$(gcol fwd_bytes_formula) gall=$(gcol bytes) gdocs=$(gcol doc_mean) glen=$(gcol seq_len)
# The formulas, from the sweep's shape (W=2, B=1, H=2, d_k=d_v=16, float32), per chunk per direction:
# Gated DeltaNet H (d_k^2 + d_k d_v), GLA H (d_k d_v + 1) (a decay per head), the chains one H d_k d_v state,
# all-gather (W-1) (N/W) H (d_k + d_v + gates).
expect() {  # subject method n -> forward bytes received by the busiest rank
  case "$1:$2" in
    gated_delta_layer:lasp2|gated_delta_layer:lasp2_allscan) echo $(( 2 * (16 * 16 + 16 * 16) * 4 )) ;;
    gla_layer:lasp2|gla_layer:lasp2_allscan) echo $(( 2 * (16 * 16 + 1) * 4 )) ;;
    *:lasp1) echo $(( 2 * 16 * 16 * 4 )) ;;
    gated_delta_layer:allgather) echo $(( $3 / 2 * 2 * (16 + 16 + 2) * 4 )) ;;
    gla_layer:allgather) echo $(( $3 / 2 * 2 * (16 + 16 + 1) * 4 )) ;;
    *:none) echo 0 ;;
  esac
}
rows=0
while IFS=, read -r subject method n fwd formula all docs; do
  want=$(expect "$subject" "$method" "$n")
  [ "$fwd" = "$want" ] && [ "$formula" = "$want" ] ||
    { echo "FAIL: $subject $method N=$n doc_mean=$docs: forward bytes $fwd, formula $formula, expected $want"; exit 1; }
  # Backward: LASP-2 gathers the same payload again (the transposed maps / the gradients entering each
  # chunk), all-gather reduce-scatters the gradients of what it gathered; the chain hands one state to
  # each rank per direction (rank 1 forward, rank 0 backward: one at the busiest rank); all-scan's
  # backward runs over the reversed communicator, whose bytes loom-bench does not count.
  case "$method" in lasp2|allgather) all_want=$(( 2 * want )) ;; *) all_want=$want ;; esac
  [ "$all" = "$all_want" ] || { echo "FAIL: $subject $method N=$n: all bytes $all, expected $all_want"; exit 1; }
  rows=$((rows + 1))
done < <(awk -F, -v f="$gfwd" -v g="$gform" -v a="$gall" -v d="$gdocs" -v l="$glen" \
           'NR > 1 { print $2 "," $3 "," $l "," $f "," $g "," $a "," $d }' "$gout/results.csv")
[ "$rows" = 40 ] || { echo "FAIL: $rows rows for the gated layers, expected 40 (2 layers x 5 methods x 2 lengths x 2)"; exit 1; }
for subject in gla_layer gated_delta_layer; do
  grep -q "^  $subject .*time vs LASP-2: .*all-gather K,V +" "$gout/report.txt" || { echo "FAIL: no projection for $subject"; exit 1; }
done
grep -q "BYTES != FORMULA" "$gout/report.txt" && { echo "FAIL: gated bytes differ from a formula"; exit 1; }
cat "$gout/report.txt"
echo "PASS"
