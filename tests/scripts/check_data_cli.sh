#!/usr/bin/env bash
# check_data_cli.sh SCENARIO BUILD_DIR MPIEXEC
# loom-data and loom-train as a user runs them, one scenario per CTest test:
# prepare never destroys its input or leaves a partial file, reads errors
# correctly and exits 2 on usage errors; a token file truncated under a
# running job ends it with a named error (no SIGBUS); --dry-run checks every
# token, val_path, the tokenizer, the checkpoint directory and memory, as a
# real run does before it builds the model; thread and size caps; --generate's
# prompt and --max-new-tokens checks and progress.
set -uo pipefail
scenario=$1 build=$(cd "$2" && pwd) mpiexec=$3
train="$build/launch/loom-train"
data="$build/launch/loom-data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mpi=("$mpiexec" --oversubscribe -np 2)

expect() {  # expect CODE REGEX OUTPUT_CODE OUTPUT
  local want=$1 regex=$2 code=$3 output=$4
  printf '%s\n' "$output"
  echo "--- exit code $code"
  if [ "$want" = nonzero ]; then [ "$code" -ne 0 ] || { echo "FAIL: expected non-zero exit"; exit 1; }
  else [ "$code" -eq "$want" ] || { echo "FAIL: expected exit $want"; exit 1; }; fi
  grep -Eq -- "$regex" <<<"$output" || { echo "FAIL: output does not match /$regex/"; exit 1; }
}
fail() { echo "FAIL: $*"; exit 1; }
no_temporaries() {  # no file named like prepare's temporary files left in $1
  local left
  left=$(find "$1" -name '*.tmp-*')
  [ -z "$left" ] || fail "temporary files left behind: $left"
}

# write_tokens PATH VOCAB COUNT LAST: a valid token file (FNV-1a checksum) of
# COUNT 2-byte tokens, i % 200 except the last one, LAST.
write_tokens() {
  perl -e '
    use strict; use integer;
    my ($path, $vocab, $count, $last) = @ARGV;
    my @tokens = map { $_ % 200 } 0 .. $count - 2;
    push @tokens, $last;
    my $body = pack("v*", @tokens);
    my $h = 1469598103934665603;
    for my $byte (unpack("C*", $body)) { $h ^= $byte; $h *= 1099511628211; }
    my $header = "LOOMTOK\0" . pack("V V V V", 1, $vocab, 2, 0) . pack("q<", $count) . pack("q<", $h) . ("\0" x 24);
    open(my $f, ">:raw", $path) or die "$path: $!";
    print $f $header, $body;
    close($f) or die "$path: $!";
  ' "$@"
}

text() { yes "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs." | head -c "$1"; }
text 300000 > "$work/tiny.txt"
common=(--set model.preset=tiny-based --set data.train_path="$work/tiny.tok" --set train.seq_len=64
        --set train.batch_size=2 --set train.log_interval=1 --set train.eval_batches=1
        --set train.checkpoint_dir="$work/ckpt")
prepare_tiny() { "$data" prepare --input "$work/tiny.txt" --output "$work/tiny.tok" > /dev/null || fail "prepare"; }

case "$scenario" in
  prepare_same_file)
    # The output is the input: by name, through a relative path, a symbolic
    # link and a hard link. Each refuses (exit 2) and the input is unchanged.
    sum=$(md5sum < "$work/tiny.txt")
    ln -s "$work/tiny.txt" "$work/link.tok"
    ln "$work/tiny.txt" "$work/hard.tok"
    for out in "$work/tiny.txt" "$work/../$(basename "$work")/tiny.txt" "$work/link.tok" "$work/hard.tok"; do
      o=$(cd "$work" && "$data" prepare --input tiny.txt --output "$out" 2>&1); c=$?
      expect 2 "--output '.*' is the input file 'tiny.txt' \(the same file\)" $c "$o"
      [ "$(md5sum < "$work/tiny.txt")" = "$sum" ] || fail "the input changed (output $out)"
    done
    [ -L "$work/link.tok" ] || fail "the link was replaced"
    no_temporaries "$work" ;;
  prepare_failed_write)
    # A write that fails halfway (file size limit: EFBIG) exits 2 naming the
    # cause, removes its temporary file and leaves the previous output intact.
    "$data" prepare --input "$work/tiny.txt" --output "$work/out.tok" > /dev/null || fail "first prepare"
    before=$(md5sum < "$work/out.tok")
    text 3000000 > "$work/big.txt"
    o=$(ulimit -f 1024; trap '' XFSZ; "$data" prepare --input "$work/big.txt" --output "$work/out.tok" 2>&1); c=$?
    expect 2 "token file '$work/out.tok': writing failed \(File too large\); the partial file '.*out.tok.tmp-[0-9-]+' was removed" $c "$o"
    no_temporaries "$work"
    [ "$(md5sum < "$work/out.tok")" = "$before" ] || fail "the previous output changed"
    o=$("$data" info "$work/out.tok" 2>&1); c=$?
    expect 0 "300000 tokens, vocabulary 256, 2 bytes per token, largest token id [0-9]+, checksum ok" $c "$o" ;;
  prepare_read_errors)
    mkdir "$work/dir"
    o=$("$data" prepare --input "$work/dir" --output "$work/a.tok" 2>&1); c=$?
    expect 2 "--input '$work/dir': the directory '$work/dir' holds no files" $c "$o"
    gzip -c "$work/tiny.txt" | head -c 400 > "$work/cut.txt.gz"
    o=$("$data" prepare --input "$work/cut.txt.gz" --output "$work/b.tok" 2>&1); c=$?
    expect 2 "input '$work/cut.txt.gz': read failed: (unexpected end of file|the compressed data ends early)" $c "$o"
    o=$("$data" prepare --input "$work/none.txt" --output "$work/c.tok" 2>&1); c=$?
    expect 2 "input '$work/none.txt': cannot open: No such file or directory" $c "$o"
    o=$("$data" prepare --input "$work/tiny.txt" --output "$work/nodir/d.tok" 2>&1); c=$?
    expect 2 "the directory '$work/nodir' does not exist" $c "$o"
    [ -z "$(ls "$work" | grep -E '\.tok')" ] || fail "a token file was written: $(ls "$work")"
    no_temporaries "$work" ;;
  prepare_documents)
    # Several inputs of every kind, each file a document (JSONL: each line);
    # info reports the documents; the byte tokens are the texts exactly.
    mkdir -p "$work/corpus/sub" "$work/g"
    printf 'alpha\n' > "$work/corpus/a.txt"
    printf 'beta beta\n' | gzip -c > "$work/corpus/sub/b.txt.gz"
    printf '{"text": "gamma"}\n{"text": "delta!", "id": 2}\n' | zstd -q -c > "$work/corpus/sub/c.jsonl.zst"
    printf 'one\n' > "$work/g/x1.txt"; printf 'two\n' > "$work/g/x2.txt"; printf 'skip' > "$work/g/y.txt"
    printf 'p one\nstill one\n\n\np two\n' > "$work/paras.txt"
    o=$("$data" prepare --input "$work/corpus" "$work/g/x*.txt" --output "$work/all.tok" 2>&1); c=$?
    expect 0 "wrote 35 tokens in 6 documents \(byte, vocabulary 256\) from 5 inputs" $c "$o"
    o=$("$data" info "$work/all.tok" 2>&1); c=$?
    expect 0 "35 tokens, .*checksum ok; 6 documents, tokens per document min 4, median 6, max 10" $c "$o"
    o=$("$data" prepare --input "$work/paras.txt" --text-documents paragraph --eod-token 0 --output "$work/p.tok" 2>&1); c=$?
    expect 0 "wrote 24 tokens in 2 documents \(byte, vocabulary 256, end-of-document token 0\)" $c "$o"
    o=$("$data" prepare --input "$work/paras.txt" --format jsonl --output "$work/p.tok" 2>&1); c=$?
    expect 2 "input '$work/paras.txt':1: malformed JSON line" $c "$o"
    # A version-1 file (no index) still loads: one document.
    write_tokens "$work/v1.tok" 256 1000 7
    o=$("$data" info "$work/v1.tok" 2>&1); c=$?
    expect 0 "1000 tokens, .*checksum ok; 1 document \(version 1 file: no document index\), tokens per document min 1000" $c "$o" ;;
  prepare_bad_inputs)
    # Every bad input: exit 2 with the file (and line) named, no output left.
    printf '{"text": "ok"}\n{"body": "x"}\n' > "$work/missing.jsonl"
    o=$("$data" prepare --input "$work/missing.jsonl" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/missing.jsonl':2: no field \"text\"" $c "$o"
    o=$("$data" prepare --input "$work/missing.jsonl" --jsonl-field body --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/missing.jsonl':1: no field \"body\"" $c "$o"
    printf '{"text": "ok"}\n{"text": "unterminated}\n' > "$work/malformed.jsonl"
    o=$("$data" prepare --input "$work/malformed.jsonl" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/malformed.jsonl':2: malformed JSON line" $c "$o"
    printf '{"text": ["a"]}\n' > "$work/array.jsonl"
    o=$("$data" prepare --input "$work/array.jsonl" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/array.jsonl':1: field \"text\" is an array, not a string" $c "$o"
    text 200000 | gzip -c > "$work/corrupt.txt.gz"
    printf '\xff\xff\xff\xff\xff\xff\xff\xff' | dd of="$work/corrupt.txt.gz" bs=1 seek=300 conv=notrunc 2>/dev/null
    o=$("$data" prepare --input "$work/corrupt.txt.gz" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/corrupt.txt.gz': read failed: " $c "$o"
    text 200000 | zstd -q -c > "$work/whole.zst"
    head -c $(( $(stat -c %s "$work/whole.zst") / 2 )) "$work/whole.zst" > "$work/cut.txt.zst"
    o=$("$data" prepare --input "$work/cut.txt.zst" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/cut.txt.zst': read failed: the compressed data ends early" $c "$o"
    printf '{"text": "a"}\n{"text": ""}\n' > "$work/empty.jsonl"
    o=$("$data" prepare --input "$work/empty.jsonl" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/empty.jsonl':2 \(field \"text\"\): empty document \(no tokens\).*--skip-empty" $c "$o"
    : > "$work/empty.txt"
    o=$("$data" prepare --input "$work/tiny.txt" "$work/empty.txt" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "input '$work/empty.txt' \(the whole file, one document\): empty document" $c "$o"
    o=$("$data" prepare --input "$work/nothing-*.txt" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "--input '$work/nothing-\*.txt': the pattern matches no file" $c "$o"
    mkdir -p "$work/hollow/deeper"
    o=$("$data" prepare --input "$work/hollow" --output "$work/o.tok" 2>&1); c=$?
    expect 2 "--input '$work/hollow': the directory '$work/hollow' holds no files" $c "$o"
    o=$("$data" prepare --input "$work/tiny.txt" --eod-token 256 --output "$work/o.tok" 2>&1); c=$?
    expect 2 "--eod-token 256 is not below the tokenizer's vocabulary 256" $c "$o"
    o=$("$data" prepare --input "$work/tiny.txt" --eod-token end --output "$work/o.tok" 2>&1); c=$?
    expect 2 "--eod-token 'end': expected a token id" $c "$o"
    [ ! -e "$work/o.tok" ] || fail "a token file was written"
    no_temporaries "$work"
    # --skip-empty: skipped and counted.
    o=$("$data" prepare --input "$work/empty.jsonl" "$work/empty.txt" --skip-empty --output "$work/o.tok" 2>&1); c=$?
    expect 0 "wrote 1 tokens in 1 document .*; skipped 2 empty documents" $c "$o" ;;
  prepare_streaming)
    # 60 MB of text as one document: prepare's memory stays bounded (the whole
    # text and its ids would take 60 + 240 MB), tokens reach the temporary file
    # while it reads, and progress lines appear on stderr.
    text 60000000 | gzip -1 > "$work/big.txt.gz"
    "$data" prepare --input "$work/tiny.txt" --output "$work/small.tok" > /dev/null & pid=$!
    base=0
    while kill -0 $pid 2>/dev/null; do
      v=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null); [ -n "$v" ] && base=$v; sleep 0.05
    done
    wait $pid || fail "small prepare"
    "$data" prepare --input "$work/big.txt.gz" --output "$work/big.tok" --progress-seconds 0.5 > "$work/out" 2> "$work/err" & pid=$!
    peak=0 grew=0
    while kill -0 $pid 2>/dev/null; do
      v=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null); [ -n "$v" ] && peak=$v
      t=$(find "$work" -name 'big.tok.tmp-*' -size +10M | head -1); [ -n "$t" ] && grew=1
      sleep 0.05
    done
    wait $pid; c=$?
    expect 0 "wrote 60000000 tokens in 1 document" $c "$(cat "$work/out")"
    cat "$work/err"
    grep -Eq "loom-data: input 1/1 '$work/big.txt.gz': [0-9.]+ MiB read, 1 document, [0-9]+ tokens" "$work/err" || fail "no progress line"
    [ "$grew" = 1 ] || fail "the temporary output did not grow past 10 MB while reading"
    echo "peak RSS ${peak} kB; small input ${base} kB"
    [ "$peak" -gt 0 ] && [ "$base" -gt 0 ] || fail "no memory sample"
    [ $((peak - base)) -lt 120000 ] || fail "peak RSS ${peak} kB is more than 120 MB above a tiny input's ${base} kB" ;;
  prepare_gcide)
    # The default corpus: one document per GCIDE entry (the .index's distinct
    # offsets, plus the entry after the last indexed one).
    dict=/usr/share/dictd/gcide.dict.dz
    [ -f "$dict" ] || { echo "SKIP: $dict missing (install dict-gcide)"; exit 0; }
    entries=$(cut -f2 /usr/share/dictd/gcide.index | sort -u | wc -l)
    o=$("$data" prepare --input "$dict" --output "$work/g.tok" 2>&1); c=$?
    expect 0 "wrote [0-9]+ tokens in [0-9]+ documents" $c "$o"
    docs=$(sed -E 's/.* in ([0-9]+) documents.*/\1/' <<<"$o")
    echo "index entries $entries, documents $docs"
    [ "$docs" -ge "$entries" ] && [ "$docs" -le $((entries + 2)) ] || fail "$docs documents for $entries index entries"
    o=$("$data" info "$work/g.tok" 2>&1); c=$?
    expect 0 "$docs documents, tokens per document min [0-9]+, median [0-9]+, max [0-9]+" $c "$o" ;;
  packed_training)
    # data.packing: a short run and its resume on a prepared multi-document
    # file, and NONE on the same file; both split and train.
    mkdir -p "$work/docs"
    for i in $(seq 1 40); do text $((500 + i * 97)) > "$work/docs/d$i.txt"; done
    "$data" prepare --input "$work/docs" --output "$work/tiny.tok" > /dev/null || fail "prepare"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=3 2>&1); c=$?
    expect 0 "step 3/3" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=3 --set data.packing=none --set train.checkpoint_dir="$work/ckpt-none" 2>&1); c=$?
    expect 0 "step 3/3" $c "$o"
    # Titans memory: documents start at multiples of model.memory_chunk (data.document_alignment 0).
    o=$("${mpi[@]}" "$train" "${common[@]}" --set model.preset=tiny-titans-mag --set train.steps=2 \
          --set train.checkpoint_dir="$work/ckpt-titans" 2>&1); c=$?
    expect 0 "step 2/2" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.packing=stacked --print-config 2>&1); c=$?
    expect 2 "allowed values are none, pack" $c "$o" ;;
  usage_errors)
    o=$("$data" prepare --input "$work/tiny.txt" --output "$work/a.tok" --bogus 2>&1); c=$?
    expect 2 "--bogus" $c "$o"
    o=$("$data" prepare --output "$work/a.tok" 2>&1); c=$?
    expect 2 "--input is required" $c "$o"
    o=$("$data" 2>&1); c=$?
    expect 2 "subcommand" $c "$o"
    o=$("$data" info 2>&1); c=$?
    expect 2 "file is required" $c "$o"
    o=$("$data" prepare --help 2>&1); c=$?
    expect 0 "--output" $c "$o" ;;
  truncated_during_run)
    # The token file loses half its bytes while loom-train reads it: a named
    # error and a non-zero exit within seconds, not a death by SIGBUS.
    text 2000000 > "$work/tiny.txt"
    prepare_tiny
    size=$(stat -c %s "$work/tiny.tok")
    "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 > "$work/log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do grep -q "step 2/" "$work/log" && break; sleep 0.25; done
    grep -q "step 2/" "$work/log" || { cat "$work/log"; kill $pid; fail "training did not start"; }
    truncate -s $((size / 2)) "$work/tiny.tok"
    start=$(date +%s)
    for _ in $(seq 1 120); do kill -0 $pid 2>/dev/null || break; sleep 0.25; done
    if kill -0 $pid 2>/dev/null; then kill -TERM $pid; wait $pid; cat "$work/log"; fail "still running 30 s after the truncation"; fi
    wait $pid; c=$?
    out=$(cat "$work/log")
    expect nonzero "token file '$work/tiny.tok': changed under the running job: it was $size bytes when opened and is now $((size / 2)) bytes" $c "$out"
    [ $c -lt 128 ] || fail "exit code $c: killed by a signal"
    if grep -Eqi "bus error|signal 7|SIGBUS|signal 11" <<<"$out"; then fail "a rank died of a signal"; fi
    echo "stopped $(( $(date +%s) - start )) s after the truncation" ;;
  replaced_during_run)
    # The path is replaced (renamed over) by a different token file: the job
    # stops naming it, as a resumed run would otherwise read other data.
    prepare_tiny
    text 100000 > "$work/other.txt"
    "$data" prepare --input "$work/other.txt" --output "$work/other.tok" > /dev/null || fail "prepare other"
    "${mpi[@]}" "$train" "${common[@]}" --set train.steps=100000 > "$work/log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do grep -q "step 2/" "$work/log" && break; sleep 0.25; done
    mv "$work/other.tok" "$work/tiny.tok"
    for _ in $(seq 1 120); do kill -0 $pid 2>/dev/null || break; sleep 0.25; done
    if kill -0 $pid 2>/dev/null; then kill -TERM $pid; wait $pid; cat "$work/log"; fail "still running 30 s after the replacement"; fi
    wait $pid; c=$?
    expect nonzero "token file '$work/tiny.tok': changed under the running job: the path now names a different file" $c "$(cat "$work/log")"
    [ $c -lt 128 ] || fail "exit code $c: killed by a signal" ;;
  token_out_of_vocabulary)
    # A file of vocabulary 300 whose very last token is 299; model.vocab_size
    # 256. Sampled windows would rarely see it: --dry-run and a real run both
    # scan the whole file, before any model exists.
    write_tokens "$work/v300.tok" 300 40000 299
    o=$("$data" info "$work/v300.tok" 2>&1); c=$?
    expect 0 "40000 tokens, vocabulary 300, 2 bytes per token, largest token id 299, checksum ok" $c "$o"
    regex="data file '$work/v300.tok' \(data.train_path\) has vocabulary 300 but model.vocab_size is 256: token id 299 at position 39999 \(of 40000 tokens\) is not below model.vocab_size 256"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.train_path="$work/v300.tok" --dry-run 2>&1); c=$?
    expect 2 "$regex" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.train_path="$work/v300.tok" --set train.steps=2 2>&1); c=$?
    expect 2 "$regex" $c "$o"
    if grep -q "step 1/" <<<"$o"; then fail "trained before checking the data"; fi
    [ ! -e "$work/ckpt" ] || fail "a checkpoint directory was created"
    # The same file as data.val_path (train_path fine) is named as such.
    prepare_tiny
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.val_path="$work/v300.tok" --dry-run 2>&1); c=$?
    expect 2 "data file '$work/v300.tok' \(data.val_path\) has vocabulary 300 but model.vocab_size is 256: token id 299 at position 39999" $c "$o" ;;
  dry_run)
    # What --dry-run checks and reports; it writes nothing.
    prepare_tiny
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.val_path="$work/tiny.tok" --dry-run 2>&1); c=$?
    expect 0 "memory per rank \(estimate\): parameters [0-9.]+ .iB \+ gradients [0-9.]+ .iB \+ AdamW moments [0-9.]+ .iB \+ activations [0-9.]+ .iB \+ logits [0-9.]+ .iB = [0-9.]+ .iB \(this node: [0-9.]+ GiB\)" $c "$o"
    grep -Eq "model '[A-Z]+': [0-9]+ parameters" <<<"$o" || fail "no parameter count"
    grep -q "data.train_path '$work/tiny.tok': 300000 tokens, every id below model.vocab_size 256" <<<"$o" || fail "no data report"
    grep -q "data.val_path '$work/tiny.tok': 300000 tokens" <<<"$o" || fail "no val_path report"
    grep -q "checkpoint directory '$work/ckpt' is writable" <<<"$o" || fail "no checkpoint directory report"
    grep -q "dry run complete" <<<"$o" || fail "no completion line"
    [ ! -e "$work/ckpt" ] || fail "the dry run created the checkpoint directory"
    [ -z "$(ls -A "$work" | grep loom-write-probe)" ] || fail "probe file left behind"
    # Each input a run needs, missing or wrong: exit 2 naming it.
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.val_path="$work/none.tok" --dry-run 2>&1); c=$?
    expect 2 "data.val_path: token file '$work/none.tok': cannot open: No such file" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.train_path="$work/none.tok" --dry-run 2>&1); c=$?
    expect 2 "data.train_path: token file '$work/none.tok': cannot open" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.tokenizer=sentencepiece --set data.tokenizer_model="$work/none.model" --dry-run 2>&1); c=$?
    expect 2 "data.tokenizer_model '$work/none.model' does not exist" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.tokenizer=sentencepiece --set data.tokenizer_model="$work/tiny.txt" --dry-run 2>&1); c=$?
    expect 2 "data.tokenizer_model '$work/tiny.txt' is not a SentencePiece model that loads" $c "$o"
    : > "$work/plainfile"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.checkpoint_dir="$work/plainfile/ckpt" --dry-run 2>&1); c=$?
    expect 2 "train.checkpoint_dir '$work/plainfile/ckpt' cannot be created: '$work/plainfile' is not a directory" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set model.preset=tiny-titans-mag --set train.seq_len=50 --dry-run 2>&1); c=$?
    expect 2 "train.seq_len = 50" $c "$o"
    # A file missing on one rank only (a node-local relative path: the ranks
    # run in different directories): every rank stops with the same named
    # error, no hang.
    mkdir -p "$work/node0" "$work/node1"
    cp "$work/tiny.tok" "$work/node0/"
    o=$(timeout 60 "$mpiexec" --oversubscribe -np 1 -wdir "$work/node0" "$train" "${common[@]}" --set data.train_path=tiny.tok --dry-run : \
        -np 1 -wdir "$work/node1" "$train" "${common[@]}" --set data.train_path=tiny.tok --dry-run 2>&1); c=$?
    expect 2 "on rank 1: data.train_path: token file 'tiny.tok': cannot open: No such file" $c "$o" ;;
  caps)
    prepare_tiny
    # (timeout: without the cap a rank would start 4096 threads.) Beyond the
    # field's range (4096) the config check names the range instead.
    o=$(timeout 60 "${mpi[@]}" "$train" "${common[@]}" --set parallel.threads_per_rank=4096 --dry-run 2>&1); c=$?
    expect 2 "parallel.threads_per_rank = 4096.*more threads than the [0-9]+ core\(s\) available to rank [0-9]" $c "$o"
    o=$(LOOM_THREADS_PER_RANK=4096 timeout 60 "${mpi[@]}" -x LOOM_THREADS_PER_RANK "$train" "${common[@]}" --dry-run 2>&1); c=$?
    expect 2 "parallel.threads_per_rank = 4096 \(or LOOM_THREADS_PER_RANK\): more threads than the [0-9]+ core\(s\) available to rank" $c "$o"
    o=$(timeout 60 "${mpi[@]}" "$train" "${common[@]}" --set parallel.threads_per_rank=100000 --dry-run 2>&1); c=$?
    expect 2 "parallel.threads_per_rank = 100000: must be <= 4096" $c "$o"
    # Logits of 4096 x 4096/2 x 65536 float32 (~6 TiB): named, not an allocator message.
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.batch_size=4096 --set train.seq_len=4096 --set model.vocab_size=65536 2>&1); c=$?
    expect 2 "train.batch_size = 4096 x train.seq_len = 4096 / 2 sp ranks x model.vocab_size = 65536: the logits need [0-9.]+ GiB per rank" $c "$o"
    # An embedding table of 4M x 32768 float32 (~512 GiB).
    o=$("${mpi[@]}" "$train" "${common[@]}" --set model.vocab_size=4194304 --set model.d_model=32768 2>&1); c=$?
    expect 2 "model.vocab_size = 4194304 x model.d_model = 32768: the embedding table alone needs [0-9.]+ GiB" $c "$o"
    if grep -qi "can't allocate\|DefaultCPUAllocator\|bad_alloc" <<<"$o"; then fail "an allocator message"; fi ;;
  generate)
    prepare_tiny
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --generate "" 2>&1); c=$?
    expect 2 "--generate: the prompt is empty" $c "$o"
    if grep -q "step 1/" <<<"$o"; then fail "trained before checking the prompt"; fi
    # Byte prompt beyond a 64-token vocabulary (MQAR data trains with it).
    o=$("${mpi[@]}" "$train" "${common[@]}" --set data.task=mqar --set data.mqar_pairs=4 --set model.vocab_size=64 \
          --set train.steps=2 --generate "AAz" 2>&1); c=$?
    expect 2 "--generate: prompt token 65 \(byte 0x41\) at position 0 is not below model.vocab_size 64" $c "$o"
    if grep -q "step 1/" <<<"$o"; then fail "trained before checking the prompt"; fi
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --generate "the" --max-new-tokens 100000 2>&1); c=$?
    expect 2 "--max-new-tokens = 100000: allowed 1 to 8192" $c "$o"
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --generate "the" --max-new-tokens 0 2>&1); c=$?
    expect 2 "--max-new-tokens = 0: allowed 1 to 8192" $c "$o"
    # Long generation reports progress every 64 tokens, with its rate.
    o=$("${mpi[@]}" "$train" "${common[@]}" --set train.steps=2 --generate "the quick" --max-new-tokens 130 2>&1); c=$?
    expect 0 "generated 64/130 tokens, [0-9.]+ tokens/s" $c "$o"
    grep -Eq "generated 128/130 tokens" <<<"$o" || fail "no progress at 128"
    grep -Eq "generated 130/130 tokens" <<<"$o" || fail "no progress at the end"
    grep -q "generated: the quick" <<<"$o" || fail "no generated text" ;;
  *) echo "unknown scenario $scenario"; exit 2 ;;
esac
echo "PASS: $scenario"
