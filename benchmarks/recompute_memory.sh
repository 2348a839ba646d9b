#!/usr/bin/env bash
# Peak memory per token of one training step of the demo model
# (configs/demo.pbtxt) with train.recompute = NONE, BLOCK and SELECTIVE at
# several sequence lengths (issue 17). Each run is one loom-train step (batch 1)
# whose progress line reports the step's peak CPU tensor memory, the maximum
# over ranks, from the counting allocator (MemoryTracker); the table divides it
# by the tokens of one rank (seq_len / sp). Prints a Markdown table.
#   benchmarks/recompute_memory.sh                       (from the repository root)
#   LENGTHS="1024 4096" NP=2 BUILD=build DATA=data/gcide.tok benchmarks/recompute_memory.sh
set -euo pipefail
BUILD=${BUILD:-build}
NP=${NP:-2}
DATA=${DATA:-data/gcide.tok}
LENGTHS=${LENGTHS:-"1024 4096 16384"}
MODES=${MODES:-"NONE BLOCK SELECTIVE"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} LOOM_THREADS_PER_RANK=${LOOM_THREADS_PER_RANK:-1}
[[ -f $DATA ]] || { echo "recompute_memory.sh: no token file $DATA (bash launch/run-demo.sh prepares it)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "| seq_len | sp | recompute | peak MiB per rank | KiB per token | vs NONE | step s |"
echo "|---:|---:|---|---:|---:|---:|---:|"
for n in $LENGTHS; do
  none_peak=""
  for mode in $MODES; do
    start=$(date +%s.%N)
    if ! out=$(mpirun --oversubscribe -np "$NP" "$BUILD/launch/loom-train" --config configs/demo.pbtxt \
                 --set parallel.sp="$NP" --set train.steps=1 --set train.batch_size=1 --set train.seq_len="$n" \
                 --set train.recompute="$mode" --set train.log_interval=1 --set train.eval_interval=0 \
                 --set train.eval_batches=1 --set train.checkpoint_dir="$work/$n-$mode" \
                 --set data.train_path="$DATA" 2>&1); then
      echo "recompute_memory.sh: loom-train failed at seq_len $n, recompute $mode:" >&2
      tail -20 <<<"$out" >&2
      exit 1
    fi
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    peak=$(grep -o 'peak [0-9.]* MiB' <<<"$out" | head -1 | awk '{print $2}')
    ms=$(grep -o '[0-9.]* ms/step' <<<"$out" | head -1 | awk '{print $1}')
    [[ -n $peak ]] || { echo "recompute_memory.sh: no peak in the progress line (seq_len $n, $mode)" >&2; exit 1; }
    [[ $mode == NONE ]] && none_peak=$peak
    per_token=$(echo "scale=2; $peak * 1024 / ($n / $NP)" | bc)
    ratio=$([[ -n $none_peak ]] && echo "scale=2; $peak / $none_peak" | bc || echo "-")
    step_s=$([[ -n $ms ]] && echo "scale=1; $ms / 1000" | bc || printf '%.0f' "$seconds")
    echo "| $n | $NP | $mode | $peak | $per_token | $ratio | $step_s |"
  done
done
