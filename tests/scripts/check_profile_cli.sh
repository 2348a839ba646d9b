#!/usr/bin/env bash
# check_profile_cli.sh BUILD_DIR MPIEXEC
# loom-train --profile (issue 19) on a tiny config at 2 ranks: after the final
# line the table has a forward and a backward row for every mixer letter of
# model.pattern, the fixed parts and "other", and rows for the collectives the
# run issues (all_reduce for gradients, all_gather for LASP-2, send/recv for
# the sliding-window halo); metrics.jsonl ends with one {"profile": ...} line
# holding the same rows. With train.recompute = BLOCK the table says that the
# backward rows hold the rerun. Without --profile nothing of it is printed.
set -uo pipefail
build=$1 mpiexec=$2
train="$build/launch/loom-train"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
yes "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs." | head -c 200000 > "$work/tiny.txt"
"$build/launch/loom-data" prepare --input "$work/tiny.txt" --output "$work/tiny.tok" > /dev/null || exit 1
common=(--set model.preset=tiny-based --set data.train_path="$work/tiny.tok" --set train.seq_len=64
        --set train.batch_size=2 --set train.steps=4 --set train.log_interval=1 --set train.eval_batches=1
        --set train.eval_interval=2)
mpi=("$mpiexec" --oversubscribe -np 2)
fail() { echo "FAIL: $*"; exit 1; }

pattern=$("$train" "${common[@]}" --print-config | sed -n "s/^ *pattern: *\"\(.*\)\"/\1/p" | head -1)
[ -n "$pattern" ] || fail "no model.pattern in --print-config"
echo "pattern: $pattern"

run() {  # run DIR EXTRA...: prints the output, fails on a non-zero exit
  local dir=$1 out code
  shift
  out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$dir" "$@" 2>&1); code=$?
  printf '%s\n' "$out"
  [ "$code" -eq 0 ] || fail "exit code $code"
  output=$out
}

run "$work/plain"
grep -q "^profile:" <<<"$output" && fail "a table without --profile"
grep -q '"profile"' "$work/plain/metrics.jsonl" && fail "a profile line without --profile"

run "$work/prof" --profile
table=$(sed -n '/^trained /,$p' <<<"$output")
grep -q "^profile: 4 steps" <<<"$table" || fail "no profile table after the final line"
letters=$(grep -o . <<<"$pattern" | sort -u)
for letter in $letters; do
  for direction in forward backward; do
    grep -Eq "^  layers $letter $direction +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$" <<<"$table" ||
      fail "no row 'layers $letter $direction'"
    grep -q "\"layers $letter $direction\": {\"s\": " "$work/prof/metrics.jsonl" ||
      fail "no 'layers $letter $direction' in metrics.jsonl"
  done
done
for part in data "embedding + head/loss" "gradient all-reduce" "gradient clipping" "optimizer step" checkpoint \
            evaluation other; do
  part_re=${part//+/[+]}  # "embedding + head/loss" as a regex
  grep -Eq "^  $part_re +[0-9.]+ " <<<"$table" || fail "no row '$part'"
done
for op in all_reduce all_gather send recv; do
  grep -Eq "^  $op +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ " <<<"$table" || fail "no collective row '$op'"
  grep -q "\"$op\": {\"calls\": [1-9]" "$work/prof/metrics.jsonl" || fail "no collective '$op' in metrics.jsonl"
done
tail -1 "$work/prof/metrics.jsonl" | grep -q '^{"profile": {"steps": 4,' || fail "metrics.jsonl does not end with the profile"
python3 -c 'import json,sys; json.loads(open(sys.argv[1]).read().splitlines()[-1])' "$work/prof/metrics.jsonl" ||
  fail "the profile line is not JSON"

run "$work/recompute" --profile --set train.recompute=BLOCK
grep -q "note: train.recompute = BLOCK: each layer's backward row includes the rerun of its forward" <<<"$output" ||
  fail "no recompute note"
echo "OK: --profile rows for every layer kind of '$pattern' and the collectives"
