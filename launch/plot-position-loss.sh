#!/usr/bin/env bash
# Plots the validation loss by position in the row that loom-train
# --position-loss-rows appended to a metrics file (the last such line; its
# buckets are runtime/train/position_loss.h's), as a PNG with gnuplot
# (gnuplot-nox, which launch/install-deps.sh installs).
#   bash launch/plot-position-loss.sh checkpoints/demo/metrics.jsonl checkpoints/demo/position-loss.png
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 METRICS.jsonl OUT.png" >&2
  exit 2
fi
metrics=$1
png=$2
[[ -f $metrics && -r $metrics ]] || { echo "$0: metrics file '$metrics' is not a readable file" >&2; exit 2; }
out_dir=$(dirname -- "$png")
[[ -d $out_dir && -w $out_dir ]] || { echo "$0: cannot write '$png': '$out_dir' is not a writable directory" >&2; exit 2; }
data=$(mktemp)
trap 'rm -f "$data"' EXIT
# One row per bucket: index, label, loss, tokens; the title line first.
python3 - "$metrics" >"$data" <<'EOF'
import json, sys
last = None
with open(sys.argv[1]) as f:
    for number, line in enumerate(f, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"{sys.argv[1]}:{number}: not a JSON line ({e.msg}); a loom-train metrics file has one per line")
        if isinstance(record, dict) and "position_loss" in record:
            last = record
if last is not None and not all(k in last for k in ("step", "seq_len")):
    sys.exit(f"{sys.argv[1]}: the last position_loss line lacks 'step' or 'seq_len' (not written by loom-train?)")
if last is None:
    sys.exit(f"{sys.argv[1]}: no position_loss line (run loom-train with --position-loss-rows)")
def text(p):
    return f"{p // 1024}K" if p > 0 and p % 1024 == 0 else str(p)
print(f"# step {last['step']}, rows of {last['seq_len']} tokens")
for i, b in enumerate(last["position_loss"]):
    if b["loss"] is not None:
        print(f"{i} \"{text(b['from'])}-{text(b['to'])}\" {b['loss']} {b['tokens']}")
EOF
title=$(head -1 "$data" | sed 's/^# //')
# gnuplot writes to stdout when it cannot open the output: keep stdout off the terminal.
gnuplot >/dev/null <<EOF
set terminal pngcairo size 900,540 font "sans,11"
set output "$png"
set title "Validation loss by position in the row ($title)"
set xlabel "positions (tokens of context before the predicted token)"
set ylabel "loss (nats per token)"
set grid ytics
set key off
set offsets 0.3, 0.3, 0.05, 0.05
set xtics rotate by -30
plot "$data" using 1:3:xtic(2) with linespoints lw 2 pt 7 lc rgb "#4472c4", \
     "$data" using 1:3:(sprintf("%.3f", \$3)) with labels offset 0,1 font "sans,9"
EOF
[[ -s $png ]] || { echo "$0: gnuplot wrote no '$png'" >&2; exit 1; }
echo "plot: $png"
