#!/usr/bin/env bash
# check_training_cli.sh SCENARIO BUILD_DIR MPIEXEC
# End-to-end checks of loom-train's failure handling, run as separate CTest
# tests (one scenario each): clear errors with exit code 2 for bad data and
# lengths, 4 for a NaN loss; a save killed halfway leaves the previous
# checkpoint loadable; SIGTERM saves a checkpoint and exits cleanly.
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

expect() {  # expect CODE REGEX OUTPUT_CODE OUTPUT
  local want=$1 regex=$2 code=$3 output=$4
  printf '%s\n' "$output"
  echo "--- exit code $code"
  if [ "$want" = nonzero ]; then [ "$code" -ne 0 ] || { echo "FAIL: expected non-zero exit"; exit 1; }
  else [ "$code" -eq "$want" ] || { echo "FAIL: expected exit $want"; exit 1; }; fi
  grep -Eq -- "$regex" <<<"$output" || { echo "FAIL: output does not match /$regex/"; exit 1; }
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
    # multiplies the weights by 1 - lr * wd = -99 each step until the loss is NaN.
    out=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=6 --set train.lr=10 --set train.weight_decay=10 --set train.warmup_steps=0 --set train.grad_clip=0 2>&1); c=$?
    expect 4 "loss is .*(nan|inf).*stopping without saving" $c "$out"
    [ -z "$(ls "$work/ckpt" 2>/dev/null | grep -v metrics)" ] || { echo "FAIL: a checkpoint was saved after the NaN"; exit 1; } ;;
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
    for _ in $(seq 1 120); do grep -q "step 3/" "$work/log" && break; sleep 0.5; done
    pkill -TERM -f "loom-train.*$work" -n  # one rank is enough: they agree after the step
    wait $pid; c=$?
    expect 0 "interrupted: saving a checkpoint" $c "$(cat "$work/log")"
    ls "$work/ckpt" | grep -q '^step-' || { echo "FAIL: no checkpoint after SIGTERM"; exit 1; } ;;
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
  offload | offload_stalled_memory_node | offload_killed_memory_node)
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
