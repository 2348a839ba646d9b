#!/usr/bin/env bash
# Length limits on the real machine (issue 17): for each model config, sp and
# train.recompute mode, one loom-train step (batch 1, real data, AdamW, chunked
# loss) at doubling sequence lengths, until the next length's predicted memory
# passes RUN_CAP_GIB for the whole machine (every rank together) or its
# predicted step time passes MAX_STEP_S. The memory measured per trial:
#   - the allocator's peak (the progress line's `peak`, maximum over ranks):
#     tensor memory, reported per token of a rank (seq_len / sp) and, times sp,
#     as the whole machine's tensor peak;
#   - every rank's peak resident set (GNU time's maxrss), summed over ranks:
#     what the machine really gave (libtorch, MPI, data file pages included).
# The prediction for the next length is the last trial's machine figure (the
# larger of the two) plus the per-token slope of the last two trials times the
# added tokens; a trial predicted above RUN_CAP_GIB is not run (the machine is
# shared). The summary gives, per configuration, the longest length that ran
# and the length where the slope reaches MACHINE_GIB (projected, not run).
# Prints Markdown tables: every trial, then the summary.
#   benchmarks/length_limits.sh                       (from the repository root)
#   CONFIGS="configs/tiny-linear-llama.pbtxt" SPS=2 MODES=BLOCK START=65536 benchmarks/length_limits.sh
set -euo pipefail
BUILD=${BUILD:-build}
DATA=${DATA:-data/gcide.tok}
CONFIGS=${CONFIGS:-"configs/demo.pbtxt configs/tiny-linear-llama.pbtxt"}
SPS=${SPS:-"1 2"}
MODES=${MODES:-"NONE BLOCK"}
START=${START:-4096}            # first length (tokens per row, all ranks)
MAX_LEN=${MAX_LEN:-4194304}     # never beyond this length
RUN_CAP_GIB=${RUN_CAP_GIB:-16}  # never run a trial predicted above this (whole machine)
MACHINE_GIB=${MACHINE_GIB:-24}  # the machine's memory, for the projected limit
MAX_STEP_S=${MAX_STEP_S:-600}   # never run a trial predicted to take longer than this
EXTRA=${EXTRA:-}                # more --set arguments for every run
VAL_FRACTION=${VAL_FRACTION:-0.1}  # unpacked rows need a validation split of one row: 0.1 of gcide is 4M tokens
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} LOOM_THREADS_PER_RANK=${LOOM_THREADS_PER_RANK:-1}
# Settings checked before anything runs: positive integers, known modes, existing configs.
settings_script=length_limits.sh
source "$(dirname "${BASH_SOURCE[0]}")/settings_checks.sh"
require_positive_integer START MAX_LEN RUN_CAP_GIB MACHINE_GIB MAX_STEP_S
require_positive_integers SPS ranks
require_recompute_modes MODES
require_files CONFIGS
require_token_file "$DATA"
require_loom_train "$BUILD"
[[ -x /usr/bin/time ]] || { echo "length_limits.sh: needs GNU time (/usr/bin/time) for each rank's resident set" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gib=$((1024 * 1024 * 1024))

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); free memory: $(free -g | awk '/^Mem:/ {print $7}') GiB available"
echo
echo "| config | sp | recompute | seq_len | peak MiB per rank | KiB per token (rank) | tensor peak GiB (machine) | RSS GiB (machine) | step s |"
echo "|---|---:|---|---:|---:|---:|---:|---:|---:|"
summary=()
for config in $CONFIGS; do
  name=$(basename "$config" .pbtxt)
  for sp in $SPS; do
    for mode in $MODES; do
      n=$START longest=0 stop="MAX_LEN $MAX_LEN" predicted=""
      prev_n=0 prev_bytes=0 last_bytes=0 last_s=0 slope=0 last_kib=""
      while ((n <= MAX_LEN)); do
        if ((prev_n > 0)); then
          predicted=$(echo "$last_bytes + $slope * ($n - $prev_n)" | bc)
          predicted_s=$(echo "$last_s * $n / $prev_n" | bc)
          if (($(echo "$predicted > $RUN_CAP_GIB * $gib" | bc))); then
            stop="memory: $n predicted $(echo "scale=1; $predicted / $gib" | bc) GiB > $RUN_CAP_GIB"; break
          fi
          if (($(echo "$predicted_s > $MAX_STEP_S" | bc))); then
            stop="time: $n predicted ${predicted_s} s > $MAX_STEP_S"; break
          fi
        fi
        avail=$(free -b | awk '/^Mem:/ {print $7}')
        if [[ -n $predicted ]] && (($(echo "$predicted > $avail" | bc))); then
          stop="free memory: $n predicted $(echo "scale=1; $predicted / $gib" | bc) GiB, $((avail / gib)) GiB available"; break
        fi
        rm -f "$work"/rss.*
        start=$(date +%s.%N)
        # Each rank under GNU time, its peak resident set in $work/rss.<rank>.
        if ! out=$(mpirun --oversubscribe -np "$sp" bash -c \
                     'exec /usr/bin/time -f %M -o "$0.${OMPI_COMM_WORLD_RANK:-0}" "$@"' "$work/rss" \
                     "$BUILD/launch/loom-train" --config "$config" \
                     --set parallel.sp="$sp" --set train.steps=1 --set train.batch_size=1 --set train.seq_len="$n" \
                     --set train.recompute="$mode" --set train.log_interval=1 --set train.eval_interval=0 \
                     --set train.eval_batches=1 --set train.checkpoint_dir="$work/ckpt" --set data.val_fraction="$VAL_FRACTION" \
                     --set data.train_path="$DATA" $EXTRA 2>&1); then
          echo "length_limits.sh: loom-train failed ($name, sp $sp, $mode, seq_len $n):" >&2
          tail -20 <<<"$out" >&2
          stop="failed at $n"; break
        fi
        rm -rf "$work/ckpt"
        seconds=$(echo "$(date +%s.%N) - $start" | bc)
        peak=$(grep -o 'peak [0-9.]* MiB' <<<"$out" | head -1 | awk '{print $2}')
        ms=$(grep -o '[0-9.]* ms/step' <<<"$out" | head -1 | awk '{print $1}')
        [[ -n $peak && -n $ms ]] || { echo "length_limits.sh: no peak or ms/step in the progress line ($name, $n)" >&2; exit 1; }
        rss_kib=$(cat "$work"/rss.* | awk '{s += $1} END {print s}')
        tensor_bytes=$(echo "$peak * 1048576 * $sp" | bc)
        rss_bytes=$((rss_kib * 1024))
        bytes=$(echo "if ($tensor_bytes > $rss_bytes) $tensor_bytes else $rss_bytes" | bc)
        step_s=$(echo "scale=1; $ms / 1000" | bc)
        last_kib=$(echo "scale=2; $peak * 1024 / ($n / $sp)" | bc)
        printf '| %s | %s | %s | %s | %s | %s | %.2f | %.2f | %s |\n' "$name" "$sp" "$mode" "$n" "$peak" "$last_kib" \
          "$(echo "scale=4; $tensor_bytes / $gib" | bc)" "$(echo "scale=4; $rss_bytes / $gib" | bc)" "$step_s"
        if ((prev_n > 0)); then slope=$(echo "scale=4; ($bytes - $last_bytes) / ($n - $prev_n)" | bc); fi
        longest=$n prev_n=$n last_bytes=$bytes last_s=$step_s
        n=$((n * 2))
      done
      if ((longest > 0)) && [[ $slope != 0 ]]; then
        projected=$(echo "$longest + ($MACHINE_GIB * $gib - $last_bytes) / $slope" | bc)
        slope_kib=$(echo "scale=2; $slope / 1024" | bc)
      else
        projected="-" slope_kib="-"
      fi
      summary+=("| $name | $sp | $mode | ${last_kib:--} | $slope_kib | $longest | $projected | $stop |")
    done
  done
done
echo
echo "| config | sp | recompute | KiB per token (rank, longest run) | machine KiB per added token | longest N run | N at ${MACHINE_GIB} GiB (projected) | search stopped by |"
echo "|---|---:|---|---:|---:|---:|---:|---|"
printf '%s\n' "${summary[@]}"
# A study in which some configuration never ran a single trial is a failure.
if printf '%s\n' "${summary[@]}" | grep -qE '\| 0 \| [^|]* \| failed at'; then
  echo "length_limits.sh: some configurations failed at their first length (see above)" >&2
  exit 1
fi
