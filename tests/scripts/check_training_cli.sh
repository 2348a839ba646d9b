#!/usr/bin/env bash
# check_training_cli.sh SCENARIO BUILD_DIR MPIEXEC
# End-to-end checks of loom-train's failure handling, run as separate CTest
# tests (one scenario each): clear errors with exit code 2 for bad data and
# lengths, 4 for a NaN loss or NaN parameters; a save killed halfway leaves the
# previous checkpoint loadable; SIGTERM/SIGINT (to a rank, twice, to mpirun, to
# a memory node) save one checkpoint; a reused directory, a second job on one
# directory, an unwritable directory or metrics file are refused. Each
# scenario checks the exit code, the message and the checkpoint directory
# afterwards (which step directories exist; the latest is loaded with its
# manifest checksums by --eval-only).
set -uo pipefail
scenario=$1 build=$2 mpiexec=$3
train="$build/launch/loom-train"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
yes "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs." | head -c 300000 > "$work/tiny.txt"
"$build/launch/loom-data" prepare --input "$work/tiny.txt" --output "$work/tiny.tok" > /dev/null || exit 1
common=(--set model.preset=tiny-based --set data.train_path="$work/tiny.tok" --set train.seq_len=64
        --set train.batch_size=2 --set train.log_interval=1 --set train.eval_batches=1
        --set train.checkpoint_dir="$work/ckpt")
mpi=("$mpiexec" --oversubscribe -np 2)
ckpt="$work/ckpt"

expect() {  # expect CODE REGEX OUTPUT_CODE OUTPUT
  local want=$1 regex=$2 code=$3 output=$4
  printf '%s\n' "$output"
  echo "--- exit code $code"
  if [ "$want" = nonzero ]; then [ "$code" -ne 0 ] || { echo "FAIL: expected non-zero exit"; exit 1; }
  else [ "$code" -eq "$want" ] || { echo "FAIL: expected exit $want"; exit 1; }; fi
  grep -Eq -- "$regex" <<<"$output" || { echo "FAIL: output does not match /$regex/"; exit 1; }
}

# The step directories of a checkpoint directory must be exactly $2 (complete
# ones; a .tmp is never a checkpoint).
expect_steps() {  # expect_steps DIR "step-00000002 step-00000004"
  local got
  got=$(ls "$1" 2>/dev/null | grep -E '^step-[0-9]+$' | tr '\n' ' ' | sed 's/ $//')
  [ "$got" = "$2" ] || { echo "FAIL: $1 holds [$got], expected [$2]"; ls -la "$1"; exit 1; }
}
# The latest checkpoint loads (sizes and manifest checksums verified) and is at step $1.
expect_latest() {  # expect_latest STEP LAUNCH... (the same launcher and flags as the run)
  local step=$1 out c
  shift
  out=$("$@" --eval-only 2>&1); c=$?
  expect 0 "resumed from .*/step-0*$step at step $step" $c "$out"
}
expect_no_lock() {
  [ ! -e "$ckpt/loom.lock" ] || { echo "FAIL: the lock file was left behind:"; cat "$ckpt/loom.lock"; exit 1; }
}
wait_for() {  # wait_for REGEX FILE SECONDS
  local i
  for i in $(seq 1 $(( $3 * 10 ))); do grep -Eq -- "$1" "$2" && return 0; sleep 0.1; done
  echo "FAIL: /$1/ did not appear in $2 within $3 s"; cat "$2"; exit 1
}
# The pid of rank R of the job that mpirun (pid M) started (from its environment).
rank_pid() {  # rank_pid M R
  local p
  for p in $(pgrep -P "$1"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then echo "$p"; return 0; fi
  done
  echo "FAIL: no rank $2 under mpirun $1" >&2; exit 1
}
stopped_step() {  # the step a "stopped by ..." line names
  grep -oE "stopped by .* after step [0-9]+" "$1" | head -1 | grep -oE '[0-9]+$'
}

case "$scenario" in
  missing_data)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set data.train_path="$work/none.tok" 2>&1); c=$?
    expect 2 "token file '$work/none.tok': cannot open" $c "$out" ;;
  empty_data)
    : > "$work/empty.tok"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set data.train_path="$work/empty.tok" 2>&1); c=$?
    expect 2 "empty.tok': file is empty" $c "$out" ;;
  vocab_too_small)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set model.vocab_size=100 2>&1); c=$?
    expect 2 "has vocabulary 256 but model.vocab_size is 100" $c "$out" ;;
  bad_sequence_length)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set model.preset=tiny-titans-mag --set train.seq_len=50 2>&1); c=$?
    expect 2 "train.seq_len = 50: .*not a multiple|train.seq_len = 50: .*the next length that works is" $c "$out" ;;
  nan_loss)
    # lr and weight_decay at the top of their ranges (loom.proto): the decay
    # multiplies the weights by 1 - lr * wd = -99 each step until the
    # parameters (checked after every update) or the loss are NaN/Inf;
    # nothing is saved.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=6 --set train.lr=10 --set train.weight_decay=10 --set train.warmup_steps=0 --set train.grad_clip=0 2>&1); c=$?
    expect 4 "(loss is .*(nan|inf)|parameters are not finite after the update of step [0-9]+).*stopping without saving" $c "$out"
    expect_steps "$ckpt" ""
    expect_no_lock ;;
  killed_save)
    out=$(LOOM_FAULT_KILL_DURING_SAVE=4 "${mpi[@]}" "$train" "${common[@]}" --set train.steps=6 --set train.checkpoint_interval=2 2>&1); c=$?
    expect nonzero "step 4/6" $c "$out"
    ls "$work/ckpt"
    [ -d "$work/ckpt/step-00000004.tmp" ] || { echo "FAIL: no partial save left behind"; exit 1; }
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=6 --eval-only 2>&1); c=$?
    expect 0 "resumed from .*step-00000002 at step 2" $c "$out" ;;
  sigterm)
    "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 > "$work/log" 2>&1 &
    pid=$!
    wait_for "step 3/" "$work/log" 120
    kill -TERM "$(rank_pid $pid 1)"  # one rank is enough: they agree after the step
    wait $pid; c=$?
    expect 0 "interrupted by SIGTERM: saving a checkpoint" $c "$(cat "$work/log")"
    grep -q "stopped by SIGTERM after step" "$work/log" || { echo "FAIL: no final message"; exit 1; }
    n=$(stopped_step "$work/log")
    expect_steps "$ckpt" "$(printf 'step-%08d' "$n")"
    expect_no_lock
    expect_latest "$n" "${mpi[@]}" "$train" "${common[@]}" ;;
  reuse_dir)
    # A new run into a directory that holds checkpoints refuses; --overwrite
    # moves them aside (never deletes them).
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 2>&1); c=$?
    expect 0 "step 2/2" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 2>&1); c=$?
    expect 2 "already holds 1 checkpoint.*step 2.*Continue them with --resume, or start over with --overwrite" $c "$out"
    expect_steps "$ckpt" "step-00000002"
    expect_no_lock
    # --dry-run says the same (it exited 0 while the run refused), and so does
    # --init-from, before it loads anything.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --dry-run 2>&1); c=$?
    expect 2 "already holds 1 checkpoint.*Continue them with --resume" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --init-from "$ckpt/step-00000002" 2>&1); c=$?
    expect 2 "already holds 1 checkpoint.*Continue them with --resume" $c "$out"
    if grep -q "initialised the model from" <<<"$out"; then echo "FAIL: --init-from loaded before the refusal"; exit 1; fi
    expect_steps "$ckpt" "step-00000002"
    out=$("${mpi[@]}" "$train" "${common[@]}" --resume --overwrite 2>&1); c=$?
    expect 2 "excludes" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=3 --overwrite 2>&1); c=$?
    expect 0 "moved the earlier checkpoints of .* into '.*/superseded-[0-9]{8}T[0-9]{6}Z' \(nothing deleted\)" $c "$out"
    expect_steps "$ckpt" "step-00000003"
    aside=$(ls -d "$ckpt"/superseded-*)
    expect_steps "$aside" "step-00000002"
    expect_latest 2 "${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$aside"
    expect_latest 3 "${mpi[@]}" "$train" "${common[@]}" ;;
  two_jobs_one_dir)
    # The lock: a second job on the directory is refused naming the first; a
    # lock left by a killed job is taken over.
    "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 > "$work/a.log" 2>&1 &
    a=$!
    wait_for "step 2/" "$work/a.log" 120
    holder=$(rank_pid $a 0)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 --resume 2>&1); c=$?
    expect 2 "in use by another job: host $(hostname) pid $holder .*holds '$ckpt/loom.lock'" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 --resume --dry-run 2>&1); c=$?
    expect 2 "in use by another job: host $(hostname) pid $holder" $c "$out"  # --dry-run too (it passed)
    kill -TERM "$(rank_pid $a 1)"
    wait $a; c=$?
    expect 0 "stopped by SIGTERM" $c "$(cat "$work/a.log")"
    expect_no_lock
    "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 --resume > "$work/b.log" 2>&1 &
    b=$!
    wait_for "step [0-9]+/100000" "$work/b.log" 120
    dead=$(rank_pid $b 0)
    kill -KILL "$dead"
    wait $b
    grep -q "^pid $dead\$" "$ckpt/loom.lock" || { echo "FAIL: the killed job left no lock"; exit 1; }
    latest=$(ls "$ckpt" | grep -E '^step-[0-9]+$' | sort | tail -1)
    n=$((10#${latest#step-}))
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=$((n + 1)) --resume 2>&1); c=$?
    expect 0 "took over the lock '$ckpt/loom.lock' left by host $(hostname) pid $dead .*no longer running" $c "$out"
    expect_no_lock
    expect_latest $((n + 1)) "${mpi[@]}" "$train" "${common[@]}" ;;
  not_writable)
    # Checked at start-up, before any step.
    echo "a file" > "$work/afile"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/afile/ckpt" --set train.steps=2 2>&1); c=$?
    expect 2 "train.checkpoint_dir.*'$work/afile/ckpt' cannot be created" $c "$out"
    if grep -q "step 1/" <<<"$out"; then echo "FAIL: trained before checking the directory"; exit 1; fi
    if [ "$(id -u)" != 0 ]; then  # permissions do not stop root
      mkdir "$work/readonly" && chmod 555 "$work/readonly"
      out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/readonly" --set train.steps=2 2>&1); c=$?
      expect 2 "checkpoint directory '$work/readonly' is not writable" $c "$out"
    fi ;;
  nan_params_at_step | nan_params_last_step)
    # NaN parameters after the update of step k (on the last rank only): exit
    # 4, nothing saved after it, the latest checkpoint is the last finite one.
    if [ "$scenario" = nan_params_at_step ]; then k=3 steps=6; else k=4 steps=4; fi
    out=$(LOOM_FAULT_NAN_PARAMS_AT_STEP=$k "${mpi[@]}" "$train" "${common[@]}" --set train.steps=$steps \
          --set train.checkpoint_interval=2 2>&1); c=$?
    expect 4 "parameters are not finite after the update of step $k[;( ].*stopping without saving" $c "$out"
    expect_steps "$ckpt" "step-00000002"
    expect_no_lock
    expect_latest 2 "${mpi[@]}" "$train" "${common[@]}" ;;
  resume_past_end)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=4 2>&1); c=$?
    expect 0 "step 4/4" $c "$out"
    # The entries and their contents (the start-up writability probe touches the directory itself).
    before=$(cd "$ckpt" && find . -mindepth 1 -printf '%p %s %T@\n' | sort)
    for steps in 4 3; do  # at, and past, train.steps
      out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=$steps --resume 2>&1); c=$?
      expect 0 "nothing to train: already at step 4 of train.steps = $steps; nothing changed" $c "$out"
      if grep -q "step 5/" <<<"$out"; then echo "FAIL: it trained"; exit 1; fi
      after=$(cd "$ckpt" && find . -mindepth 1 -printf '%p %s %T@\n' | sort)
      [ "$before" = "$after" ] || { echo "FAIL: the checkpoint directory changed"; diff <(echo "$before") <(echo "$after"); exit 1; }
    done ;;
  resume_keeps_bound)
    # train.keep_checkpoints bounds the directory across resumes (each session
    # pruned only its own: 5 sessions of keep 2 left 10 checkpoints).
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=3 --set train.checkpoint_interval=1 2>&1); c=$?
    expect 0 "step 3/3" $c "$out"
    expect_steps "$ckpt" "step-00000002 step-00000003"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=4 --set train.checkpoint_interval=1 --resume 2>&1); c=$?
    expect 0 "step 4/4" $c "$out"
    expect_steps "$ckpt" "step-00000003 step-00000004"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=6 --set train.checkpoint_interval=1 --set train.keep_checkpoints=3 --resume 2>&1); c=$?
    expect 0 "step 6/6" $c "$out"
    expect_steps "$ckpt" "step-00000004 step-00000005 step-00000006"
    expect_latest 6 "${mpi[@]}" "$train" "${common[@]}"
    # A run that kept every checkpoint (keep 0) keeps its history when resumed with the default keep 2.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=8 --set train.checkpoint_interval=1 --set train.keep_checkpoints=0 --resume 2>&1); c=$?
    expect 0 "step 8/8" $c "$out"
    expect_steps "$ckpt" "step-00000004 step-00000005 step-00000006 step-00000007 step-00000008"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=9 --set train.checkpoint_interval=1 --resume 2>&1); c=$?
    expect 0 "the resumed run kept every checkpoint .keep_checkpoints 0., its 5 stay" $c "$out"
    expect_steps "$ckpt" "step-00000004 step-00000005 step-00000006 step-00000007 step-00000008 step-00000009" ;;
  resume_model_mismatch)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 2>&1); c=$?
    expect 0 "step 2/2" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=4 --resume --set model.d_model=48 2>&1); c=$?
    expect 2 "cannot resume from '.*step-00000002': it holds a different model .*model.d_model [0-9]+ -> 48" $c "$out"
    expect_steps "$ckpt" "step-00000002"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=4 --resume --set train.lr=1e-3 --set train.log_interval=2 2>&1); c=$?
    expect 0 "differ from the checkpoint's \(allowed\): .*train.lr .*train.log_interval 1 -> 2" $c "$out"
    grep -q "step 4/4" <<<"$out" || { echo "FAIL: did not continue to step 4"; exit 1; }
    expect_steps "$ckpt" "step-00000002 step-00000004" ;;
  init_from)
    # A model-only checkpoint (loom-ckpt import) cannot be resumed: exit 2
    # pointing at --init-from, which starts a new run from its weights.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 2>&1); c=$?
    expect 0 "final validation loss" $c "$out"
    val=$(grep -Eo "final validation loss [0-9.e+-]+" <<<"$out" | awk '{print $4}')
    "$build/launch/loom-ckpt" export "$ckpt/step-00000002" -o "$work/weights.safetensors" --format safetensors > /dev/null || exit 1
    "$build/launch/loom-ckpt" import "$work/weights.safetensors" -o "$work/imported" > /dev/null || exit 1
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/imported" --set train.steps=4 --resume 2>&1); c=$?
    expect 2 "it holds the model only .*--init-from $work/imported/step-00000002" $c "$out"
    # With lr 1e-30 the weights stay as loaded (updates below rounding): the new run's validation loss is
    # the first run's, to the printed digits.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/new" --set train.steps=1 --set train.lr=1e-30 \
          --init-from "$work/imported/step-00000002" 2>&1); c=$?
    expect 0 "initialised the model from '$work/imported/step-00000002' \(step 2 of its run\); training starts at step 0" $c "$out"
    grep -q "final validation loss $val " <<<"$out" || { echo "FAIL: validation loss after --init-from is not $val"; exit 1; }
    [ -d "$work/new/step-00000001" ] || { echo "FAIL: no step-00000001 in the new run"; exit 1; }
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/other" --set model.d_model=48 \
          --init-from "$work/imported/step-00000002" 2>&1); c=$?
    expect 2 "--init-from: cannot start from .*it holds a different model .*model.d_model [0-9]+ -> 48" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/other" --init-from "$work/none" 2>&1); c=$?
    expect 2 "--init-from '$work/none': not a checkpoint directory" $c "$out"
    [ ! -e "$work/other" ] || { echo "FAIL: a refused run created its checkpoint directory"; exit 1; } ;;
  sigint_twice)
    # SIGINT to a rank, then again (to it and another rank) while the
    # checkpoint is being written: ignored, one checkpoint, exit 0.
    LOOM_FAULT_SLOW_SAVE_S=3 "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 > "$work/log" 2>&1 &
    pid=$!
    wait_for "step 3/" "$work/log" 120
    kill -INT "$(rank_pid $pid 1)"
    wait_for "pausing 3 s halfway through saving step" "$work/log" 60
    kill -INT "$(rank_pid $pid 1)"
    kill -INT "$(rank_pid $pid 0)"
    wait $pid; c=$?
    expect 0 "SIGINT received again: ignored while the step and the checkpoint finish" $c "$(cat "$work/log")"
    n=$(stopped_step "$work/log")
    expect_steps "$ckpt" "$(printf 'step-%08d' "$n")"
    [ -z "$(ls "$ckpt" | grep '\.tmp$')" ] || { echo "FAIL: an unfinished save was left"; exit 1; }
    expect_no_lock
    expect_latest "$n" "${mpi[@]}" "$train" "${common[@]}" ;;
  sigint_twice_mpirun)
    # Two SIGINTs to mpirun while a checkpoint is written: OpenMPI kills the
    # job at once. The previous checkpoint stays complete and the latest; the
    # cut one is never taken for a checkpoint; the next run takes the lock over.
    LOOM_FAULT_SLOW_SAVE_S=5 "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 --set train.checkpoint_interval=2 \
      > "$work/log" 2>&1 &
    pid=$!
    wait_for "checkpoint .*step-00000002" "$work/log" 120
    wait_for "pausing 5 s halfway through saving step 4" "$work/log" 60
    ranks=$(pgrep -P $pid | tr '\n' ' ')
    kill -INT $pid
    sleep 0.3
    kill -INT $pid
    wait $pid; c=$?
    expect nonzero "pausing 5 s halfway through saving step 4" $c "$(cat "$work/log")"
    # mpirun can exit a moment before the kernel has reaped the ranks it
    # killed; the lock test below needs them gone (up to 30 s under load).
    for i in $(seq 1 300); do
      alive=0
      for r in $ranks; do kill -0 "$r" 2>/dev/null && alive=1; done
      [ $alive -eq 0 ] && break
      sleep 0.1
    done
    expect_steps "$ckpt" "step-00000002"
    [ -d "$ckpt/step-00000004.tmp" ] || { echo "FAIL: expected the cut save step-00000004.tmp"; ls -la "$ckpt"; exit 1; }
    expect_latest 2 "${mpi[@]}" "$train" "${common[@]}"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=3 --resume 2>&1); c=$?
    expect 0 "took over the lock .*no longer running" $c "$out"
    expect_steps "$ckpt" "step-00000002 step-00000003"
    expect_no_lock ;;
  sigterm_mpirun)
    # SIGTERM to mpirun: OpenMPI sends the ranks SIGCONT, waits
    # odls_base_sigkill_timeout seconds, sends SIGTERM, waits as long again and
    # kills. With room for a step and a save (20 s: CI runs two tests at once
    # on two cores), the ranks stop with a checkpoint;
    # mpirun itself exits non-zero (it was told to abort).
    "$mpiexec" --oversubscribe -np 2 --mca odls_base_sigkill_timeout 20 "$train" "${common[@]}" --set train.steps=100000 \
      > "$work/log" 2>&1 &
    pid=$!
    wait_for "step 3/" "$work/log" 120
    kill -TERM $pid
    wait $pid; c=$?
    expect nonzero "stopped by SIGTERM after step [0-9]+: checkpoint .* is the latest" $c "$(cat "$work/log")"
    n=$(stopped_step "$work/log")
    expect_steps "$ckpt" "$(printf 'step-%08d' "$n")"
    expect_no_lock
    expect_latest "$n" "${mpi[@]}" "$train" "${common[@]}" ;;
  metrics_disk_full)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --set train.metrics_path=/dev/full 2>&1); c=$?
    expect 2 "train.metrics_path: writing the metrics file '/dev/full' failed: No space left on device" $c "$out"
    if grep -q "step 1/" <<<"$out"; then echo "FAIL: trained with an unwritable metrics file"; exit 1; fi
    expect_steps "$ckpt" ""
    expect_no_lock ;;
  metrics_run_header)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 2>&1); c=$?
    expect 0 "step 2/2" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=4 --resume 2>&1); c=$?
    expect 0 "step 4/4" $c "$out"
    cat "$ckpt/metrics.jsonl"
    headers=$(grep -E '^\{"run": "[^"]+", "config_hash": "[0-9a-f]{16}", "start_step": [0-9]+, "resumed_from_step": ' "$ckpt/metrics.jsonl")
    [ "$(wc -l <<<"$headers")" -eq 2 ] || { echo "FAIL: expected two run headers"; exit 1; }
    [ "$(grep -oE '"run": "[^"]+"' <<<"$headers" | sort -u | wc -l)" -eq 2 ] || { echo "FAIL: run ids repeat"; exit 1; }
    sed -n 1p <<<"$headers" | grep -q '"resumed_from_step": null' || { echo "FAIL: first header"; exit 1; }
    sed -n 2p <<<"$headers" | grep -q '"start_step": 2, "resumed_from_step": 2' || { echo "FAIL: second header"; exit 1; } ;;
  resume_other_layout)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=4 --set train.checkpoint_interval=2 2>&1); c=$?
    expect 0 "checkpoint .*step-00000004" $c "$out"
    # The same run continued on one rank (sp = 1): parameters are replicated.
    out=$("$mpiexec" -np 1 "$train" "${common[@]}" --set train.steps=6 --resume 2>&1); c=$?
    expect 0 "resuming a dp=1 x sp=2 checkpoint as dp=1 x sp=1" $c "$out"
    grep -q "step 6/6" <<<"$out" || { echo "FAIL: did not continue to step 6"; exit 1; } ;;
  mqar_eval)
    out=$("${mpi[@]}" "$train" "${common[@]}" --set data.task=mqar --set data.mqar_pairs=4 --set train.steps=3 2>&1); c=$?
    expect 0 "MQAR accuracy [0-9.]+ \\([0-9]+ of [0-9]+ queries\\)" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set data.task=mqar --set data.mqar_pairs=4 --eval-only 2>&1); c=$?
    expect 0 "MQAR accuracy" $c "$out" ;;
  sentencepiece)
    out=$("$build/launch/loom-data" train-tokenizer --input "$work/tiny.txt" --model-prefix "$work/sp" --vocab-size 320 2>&1); c=$?
    expect 0 "wrote .*sp.model" $c "$out"
    out=$("$build/launch/loom-data" prepare --input "$work/tiny.txt" --output "$work/sp.tok" --tokenizer sentencepiece --model "$work/sp.model" 2>&1); c=$?
    expect 0 "vocabulary 320" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set data.train_path="$work/sp.tok" --set data.tokenizer=sentencepiece \
          --set data.tokenizer_model="$work/sp.model" --set model.vocab_size=320 --set train.steps=2 --generate "the quick" --max-new-tokens 4 2>&1); c=$?
    expect 0 "generated: the quick" $c "$out" ;;
  bfloat16)
    # Mixed precision: bf16 parameters with float32 masters, saved and resumed.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.dtype=bfloat16 --set train.steps=4 --set train.checkpoint_interval=2 2>&1); c=$?
    expect 0 "checkpoint .*step-00000004" $c "$out"
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.dtype=bfloat16 --set train.steps=6 --resume 2>&1); c=$?
    expect 0 "step 6/6" $c "$out" ;;
  cross_node)
    # The path between nodes: TCP only, over loopback (tests/CMakeLists.txt,
    # LOOM_CROSS_NODE_MPIRUN_FLAGS; docker/README.md names the same settings).
    out=$("$mpiexec" --oversubscribe -np 2 --mca btl tcp,self --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
          "$train" "${common[@]}" --set train.steps=4 2>&1); c=$?
    expect 0 "step 4/4" $c "$out" ;;
  cuda_request)
    # Exit 3 (not supported here): no CUDA device on a CPU build; on a GPU
    # machine, fewer GPUs than the 2 ranks (with 2 GPUs the run trains).
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.device=cuda --set train.steps=2 2>&1); c=$?
    if [ $c -eq 0 ]; then expect 0 "step 2/2" $c "$out"
    else expect 3 "train.device = cuda: (no CUDA device is visible|2 ranks on this node but only 1 CUDA)" $c "$out"; fi ;;
  offload | offload_stalled_memory_node | offload_killed_memory_node | sigterm_memory_node)
    # 2 compute ranks + 1 memory node holding the softmax layer's K,V.
    offload=(--set model.preset=tiny-linear-llama-hybrid --set parallel.softmax_method=OFFLOAD
             --set offload.memory_ranks=1 --set parallel.comm_timeout_s=10)
    np3=("$mpiexec" --oversubscribe -np 3)
    case "$scenario" in
      offload)
        out=$("${np3[@]}" "$train" "${common[@]}" "${offload[@]}" --set train.steps=4 --generate "the quick" --max-new-tokens 4 2>&1); c=$?
        expect 0 "2 compute ranks \+ 1 memory nodes" $c "$out"
        grep -q "generated: the quick" <<<"$out" || { echo "FAIL: no generation"; exit 1; } ;;
      offload_stalled_memory_node)
        # The node stops answering: the compute ranks' watchdog names it and the request.
        start=$(date +%s)
        out=$(LOOM_FAULT_MEMORY_NODE_STALL_AFTER=6 timeout 120 "${np3[@]}" "$train" "${common[@]}" "${offload[@]}" --set train.steps=4 2>&1); c=$?
        expect nonzero "offload [A-Z_]+ of call [0-9]+ with memory node rank 2\) did not complete within 10 s" $c "$out"
        [ $(( $(date +%s) - start )) -lt 60 ] || { echo "FAIL: took too long to stop"; exit 1; } ;;
      offload_killed_memory_node)
        out=$(LOOM_FAULT_MEMORY_NODE_KILL_AFTER=6 timeout 120 "${np3[@]}" "$train" "${common[@]}" "${offload[@]}" --set train.steps=4 2>&1); c=$?
        expect nonzero "rank 2 .*(exited on signal 9|Killed)" $c "$out" ;;
      sigterm_memory_node)
        # The memory node keeps serving and asks the compute ranks to stop:
        # they save one checkpoint after their step, then shut it down; exit 0.
        "${np3[@]}" "$train" "${common[@]}" "${offload[@]}" --set train.steps=100000 > "$work/log" 2>&1 &
        pid=$!
        wait_for "step 2/" "$work/log" 120
        kill -TERM "$(rank_pid $pid 2)"
        wait $pid; c=$?
        expect 0 "memory node: SIGTERM received: asking the compute ranks to stop" $c "$(cat "$work/log")"
        grep -q "stopped by a signal to memory node rank 2 after step" "$work/log" || { echo "FAIL: no final message"; exit 1; }
        n=$(stopped_step "$work/log")
        expect_steps "$ckpt" "$(printf 'step-%08d' "$n")"
        expect_no_lock
        expect_latest "$n" "${np3[@]}" "$train" "${common[@]}" "${offload[@]}" ;;
    esac ;;
  val_path)
    # Validation on a held-out token file (data.val_path) instead of the train
    # file's tail: another text, so another validation loss; the progress line
    # and metrics.jsonl carry the gradient norm.
    tr 'a-z' 'A-Z' < "$work/tiny.txt" | head -c 60000 > "$work/held.txt"
    "$build/launch/loom-data" prepare --input "$work/held.txt" --output "$work/held.tok" > /dev/null || exit 1
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --set train.checkpoint_dir="$work/tail" 2>&1); c=$?
    expect 0 "final validation loss" $c "$out"
    tail_loss=$(grep -Eo "final validation loss [0-9.]+" <<<"$out")
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --set train.checkpoint_dir="$work/held" \
          --set data.val_path="$work/held.tok" 2>&1); c=$?
    expect 0 "step 2/2 loss [0-9.]+ lr [0-9.e+-]+ grad norm [0-9.e+-]+" $c "$out"
    held_loss=$(grep -Eo "final validation loss [0-9.]+" <<<"$out")
    echo "train-file tail: $tail_loss; held-out file: $held_loss"
    [ -n "$held_loss" ] && [ "$held_loss" != "$tail_loss" ] || { echo "FAIL: data.val_path did not change the validation data"; exit 1; }
    grep -Eq '"grad_norm": [0-9]' "$work/held/metrics.jsonl" || { echo "FAIL: no grad_norm in metrics.jsonl"; exit 1; }
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/none" --set data.val_path="$work/none.tok" 2>&1); c=$?
    expect 2 "data.val_path: token file '$work/none.tok': cannot open" $c "$out" ;;
  *) echo "unknown scenario $scenario"; exit 2 ;;
esac
echo "PASS: $scenario"
