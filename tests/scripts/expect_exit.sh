#!/usr/bin/env bash
# expect_exit.sh CODE REGEX MAX_SECONDS -- COMMAND...
# Runs COMMAND and passes when its exit code is CODE ("nonzero" for any
# non-zero), its combined output matches the extended REGEX, and it finished
# within MAX_SECONDS. Prints the output either way.
set -u
expected=$1 regex=$2 max_seconds=$3
shift 3
[ "$1" = "--" ] && shift
start=$(date +%s%N)
output=$(timeout --kill-after=5 "$((max_seconds + 30))" "$@" 2>&1)
code=$?
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
elapsed="$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))"
printf '%s\n' "$output"
echo "--- exit code $code after ${elapsed}s"
fail=0
if [ "$expected" = "nonzero" ]; then
  [ "$code" -ne 0 ] || { echo "FAIL: expected a non-zero exit code"; fail=1; }
else
  [ "$code" -eq "$expected" ] || { echo "FAIL: expected exit code $expected"; fail=1; }
fi
printf '%s\n' "$output" | grep -Eq -- "$regex" || { echo "FAIL: output does not match /$regex/"; fail=1; }
if [ "$elapsed_ms" -gt "$((max_seconds * 1000))" ]; then echo "FAIL: took longer than ${max_seconds}s"; fail=1; fi
exit $fail
