#!/usr/bin/env bash
# Throughput at length (issue 17): tokens/s of the demo model (configs/demo.pbtxt,
# sp = 2, batch 1) at several sequence lengths, and the same for each of its
# layer kinds alone (model.pattern = L, W, C, M: one block of that mixer and
# its MLP, with the embedding and the chunked loss), in one run. Each point is
# STEPS loom-train steps; the last step's ms/step is reported (the first one
# pays for first-touch page faults). A point uses train.recompute = NONE unless
# its memory, extrapolated from the same pattern's previous length, would pass
# RUN_CAP_GIB for the whole machine; then BLOCK (the table says which).
# "us per token" is the step time divided by the row's tokens (all ranks);
# "vs first" is that over the first length's, the figure that must stay within
# 1.5x for a linear-time layer. Prints a Markdown table.
#   benchmarks/throughput_at_length.sh                        (from the repository root)
#   LENGTHS="4096 16384" PATTERNS="LWCM L" benchmarks/throughput_at_length.sh
set -euo pipefail
BUILD=${BUILD:-build}
DATA=${DATA:-data/gcide.tok}
CONFIG=${CONFIG:-configs/demo.pbtxt}
NP=${NP:-2}
LENGTHS=${LENGTHS:-"4096 16384 65536 262144"}
PATTERNS=${PATTERNS:-"LWCM L W C M"}
STEPS=${STEPS:-2}
RUN_CAP_GIB=${RUN_CAP_GIB:-16}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} LOOM_THREADS_PER_RANK=${LOOM_THREADS_PER_RANK:-1}
# Settings checked before anything runs: positive integers, an existing config.
settings_script=throughput_at_length.sh
source "$(dirname "${BASH_SOURCE[0]}")/settings_checks.sh"
require_positive_integer NP STEPS RUN_CAP_GIB
require_positive_integers LENGTHS tokens
require_file CONFIG
require_token_file "$DATA"
require_loom_train "$BUILD"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gib=$((1024 * 1024 * 1024))

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| pattern | seq_len | sp | recompute | ms/step | tokens/s | us per token | vs first | peak MiB per rank |"
echo "|---|---:|---:|---|---:|---:|---:|---:|---:|"
for pattern in $PATTERNS; do
  first_us="" none_n=0 none_peak=0  # the last NONE point: NONE's memory grows about linearly from it
  for n in $LENGTHS; do
    mode=NONE
    if ((none_n > 0)) && (($(echo "$none_peak * 1048576 * $NP * $n / $none_n > $RUN_CAP_GIB * $gib" | bc))); then
      mode=BLOCK
    fi
    if ! out=$(mpirun --oversubscribe -np "$NP" "$BUILD/launch/loom-train" --config "$CONFIG" \
                 --set model.pattern="$pattern" --set parallel.sp="$NP" --set train.steps="$STEPS" \
                 --set train.batch_size=1 --set train.seq_len="$n" --set train.recompute="$mode" \
                 --set train.log_interval=1 --set train.eval_interval=0 --set train.eval_batches=1 \
                 --set train.checkpoint_dir="$work/ckpt" --set data.train_path="$DATA" 2>&1); then
      echo "throughput_at_length.sh: loom-train failed (pattern $pattern, seq_len $n, $mode):" >&2
      tail -20 <<<"$out" >&2
      exit 1
    fi
    rm -rf "$work/ckpt"
    ms=$(grep -o '[0-9.]* ms/step' <<<"$out" | tail -1 | awk '{print $1}')
    peak=$(grep -o 'peak [0-9.]* MiB' <<<"$out" | tail -1 | awk '{print $2}')
    [[ -n $ms && -n $peak ]] || { echo "throughput_at_length.sh: no ms/step or peak (pattern $pattern, $n)" >&2; exit 1; }
    us=$(echo "scale=3; $ms * 1000 / $n" | bc)
    [[ -n $first_us ]] || first_us=$us
    printf '| %s | %s | %s | %s | %.0f | %.0f | %.1f | %.2f | %s |\n' "$pattern" "$n" "$NP" "$mode" "$ms" \
      "$(echo "$n * 1000 / $ms" | bc -l)" "$us" "$(echo "$us / $first_us" | bc -l)" "$peak"
    if [[ $mode == NONE ]]; then none_n=$n none_peak=$peak; fi
  done
done
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
