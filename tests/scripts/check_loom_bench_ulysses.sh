#!/usr/bin/env bash
# check_loom_bench_ulysses.sh LOOM_BENCH MPIEXEC SWEEP: runs the Ulysses / USP
# sweep (tests/data/tiny_sweep_ulysses.pbtxt) at 4 ranks and checks every
# point's forward bytes per rank against the formulas written out here (not
# the cost model's code), the flat rows' forward+backward bytes, the row count,
# and the projection lines of the head-parallel methods.
# Shape: B = 1, H = 4, d = 16, float32 (lse float32: 4 bytes).
set -uo pipefail
bench=$1 mpiexec=$2 sweep=$3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$mpiexec" --oversubscribe -np 4 "$bench" --sweep "$sweep" --out "$out" || { echo "FAIL: loom-bench exited $?"; exit 1; }
col() { head -1 "$out/results.csv" | tr , '\n' | grep -nx "$1" | cut -d: -f1; }
fwd=$(col fwd_bytes) form=$(col fwd_bytes_formula) all=$(col bytes) docs=$(col doc_mean) len=$(col seq_len) world=$(col world)
# subject method W N packed -> forward bytes received per rank
expect() {
  local s=$1 m=$2 W=$3 N=$4 packed=$5 local_n=$(( $4 / $3 )) b=0 U
  case "$s:$m" in
    softmax_layer:ulysses) U=$W; b=$(( (U - 1) * (4 / U) * local_n * (4 * 16 * 4 + 4) )) ;;
    # all-to-all in groups of 2 (q, k, v, out, lse), one ring step of K,V: rank's tokens x 4 heads
    softmax_layer:usp2) U=2; b=$(( (U - 1) * (4 / U) * local_n * (4 * 16 * 4 + 4) + 2 * 4 * local_n * 16 * 4 )) ;;
    linear_layer:ulysses) U=$W; b=$(( (U - 1) * (4 / U) * local_n * (4 * 16) * 4 )) ;;
    gla_layer:ulysses) U=$W; b=$(( (U - 1) * (4 / U) * local_n * (4 * 16 + 1) * 4 )) ;;
    gated_delta_layer:ulysses) U=$W; b=$(( (U - 1) * (4 / U) * local_n * (4 * 16 + 2) * 4 )) ;;
    *) echo "unexpected $s $m"; return ;;
  esac
  [ "$packed" = 1 ] && b=$(( b + (U - 1) * local_n * 8 ))  # document starts gathered in the group
  echo $b
}
# Backward of flat rows: the same all-to-alls without the lse (and, USP, the ring's K,V again
# plus dK,dV on every one of its 2 steps).
expect_all() {
  local s=$1 m=$2 W=$3 N=$4 f=$5 local_n=$(( $4 / $3 ))
  case "$s:$m" in
    softmax_layer:ulysses) echo $(( 2 * f - (W - 1) * (4 / W) * local_n * 4 )) ;;
    softmax_layer:usp2) echo $(( 2 * f - 1 * 2 * local_n * 4 + 2 * (2 * 4 * local_n * 16 * 4) )) ;;
    *) echo $(( 2 * f )) ;;
  esac
}
rows=0
while IFS=, read -r W subject method n got formula all_got doc; do
  packed=0; [ "$doc" != 0 ] && packed=1
  want=$(expect "$subject" "$method" "$W" "$n" "$packed")
  [ "$got" = "$want" ] && [ "$formula" = "$want" ] ||
    { echo "FAIL: W=$W $subject $method N=$n doc_mean=$doc: forward bytes $got, formula $formula, expected $want"; exit 1; }
  if [ $packed = 0 ]; then
    all_want=$(expect_all "$subject" "$method" "$W" "$n" "$want")
    [ "$all_got" = "$all_want" ] || { echo "FAIL: W=$W $subject $method N=$n: all bytes $all_got, expected $all_want"; exit 1; }
  fi
  rows=$((rows + 1))
done < <(awk -F, -v w="$world" -v f="$fwd" -v g="$form" -v a="$all" -v d="$docs" -v l="$len" \
           'NR > 1 { print $w "," $2 "," $3 "," $l "," $f "," $g "," $a "," $d }' "$out/results.csv")
# softmax: ulysses at W = 2, 4 and usp2 at W = 4; linear, GLA, Gated DeltaNet: ulysses at W = 2, 4;
# each at 2 lengths, flat and packed.
[ "$rows" = 36 ] || { echo "FAIL: $rows rows, expected 36 ((3 + 3 x 2) x 2 lengths x 2 rows)"; exit 1; }
grep -q "BYTES != FORMULA" "$out/report.txt" && { echo "FAIL: bytes differ from a formula"; exit 1; }
grep -q "^  softmax_layer test .*usp8 .* vs ring" "$out/report.txt" || { echo "FAIL: no USP projection"; exit 1; }
grep -q "^  softmax_layer test .*ulysses not possible (32 heads, group of 64)" "$out/report.txt" ||
  { echo "FAIL: Ulysses at 64 ranks with 32 heads not reported as impossible"; exit 1; }
grep -q "usp8,.*,softmax_layer" "$out/projections.csv" || { echo "FAIL: projections.csv lacks USP"; exit 1; }
cat "$out/report.txt"
echo "PASS"
