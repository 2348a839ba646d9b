#!/usr/bin/env bash
# plot_bench.sh OUT_DIR: PNG plots of loom-bench's results.csv with gnuplot:
# throughput vs sequence length per method (as the LASP-2 paper's Figure 3),
# peak memory vs length, forward bytes vs world size. Exit 1 without gnuplot.
set -euo pipefail
out=$1
command -v gnuplot > /dev/null || { echo "plot_bench: gnuplot not installed" >&2; exit 1; }
csv="$out/results.csv"
# One data file per (subject, method): lengths at the largest world size, and world sizes at the longest length.
wmax=$(awk -F, 'NR > 1 && $1 > m { m = $1 } END { print m }' "$csv")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
awk -F, -v w="$wmax" -v d="$tmp" 'NR > 1 && ($1 == w || $3 == "none") { f = d "/len_" $2 "_" $3 ".dat"; print $4, $8, $9 / 1048576 >> f }' "$csv"
# Bytes vs world size at each subject's longest length (the tiny model may round lengths up).
awk -F, -v d="$tmp" 'NR == FNR { if (FNR > 1 && $4 > m[$2]) m[$2] = $4; next }
  FNR > 1 && $3 != "none" && $4 == m[$2] { f = d "/world_" $2 "_" $3 ".dat"; print $1, $10, $4 >> f }' "$csv" "$csv"
plot_family() {  # plot_family PREFIX COLUMN YLABEL TITLE PNG LOGX
  local prefix=$1 col=$2 ylabel=$3 title=$4 png=$5 logx=$6 cmd="" f
  for f in "$tmp"/"$prefix"_*.dat; do
    [ -e "$f" ] || continue
    sort -n -o "$f" "$f"
    local name; name=$(basename "$f" .dat); name=${name#"$prefix"_}
    cmd+="${cmd:+, }'$f' using 1:$col with linespoints title '${name//_/ }'"
  done
  [ -n "$cmd" ] || return 0
  gnuplot <<GP
set terminal pngcairo size 1100,800 noenhanced
set output '$png'
set title '$title'
set xlabel '$( [ "$logx" = 1 ] && echo "sequence length (tokens)" || echo "world size (ranks)")'
set ylabel '$ylabel'
set logscale y
$( [ "$logx" = 1 ] && echo "set logscale x 2" )
set key below maxcols 3 font ',9'
set grid
plot $cmd
GP
}
plot_family len 2 "tokens/s" "throughput vs sequence length (W=$wmax; none = one rank)" "$out/throughput_vs_length.png" 1
plot_family len 3 "peak tensor MiB per rank" "memory vs sequence length (W=$wmax)" "$out/memory_vs_length.png" 1
plot_family world 2 "forward bytes received per rank" "bytes moved vs world size (longest length of each subject)" "$out/bytes_vs_world.png" 0
ls "$out"/*.png
