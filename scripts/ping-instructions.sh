#!/usr/bin/env bash
# Instructions each tunnel end executes per ping, weft against boringtun-cli, counted by
# callgrind (this machine's VM has no hardware counters for perf). Root; needs valgrind.
#
#   scripts/ping-instructions.sh [weft-binary-dir] [top]
#
# `weft-binary-dir` holds release builds of `weft` and `weft-bench` (default: target/release,
# built first). `weft-bench small` runs both paths twice under callgrind, with 300 and with
# 1300 pings; the difference of the two runs' counts, over 1000, is what one ping costs each
# end, start-up and teardown cancelling out. Prints the total per ping for each tool's first
# end, then weft's `top` functions (default 25). Timings under callgrind mean nothing; only
# the counts are read.
#
# With HOT_SYMBOLS=FILE it also writes FILE: the symbols of every function of the weft binary
# that a ping runs (half an instruction or more per ping), hottest first, for the linker to lay out
# side by side (link/README.md); weft's names are then shown mangled.
#
#   HOT_SYMBOLS=link/hot-symbols.txt scripts/ping-instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/release}
top=${2:-25}
if [ "$dir" = target/release ]; then
  cargo build --release --locked --bin weft >&2
  cargo build --release --locked -p weft-bench >&2
fi
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (the bench makes network namespaces)" >&2; exit 1; }

work=$(mktemp -d /tmp/weft-pingins.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/tools/bin" "$work/out"
cp "$dir/weft-bench" "$work/bin/"
real_weft=$(realpath "$dir/weft")
demangle=$([ -n "${HOT_SYMBOLS:-}" ] && echo no || echo yes)
cat >"$work/bin/weft" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=$demangle --callgrind-out-file=$work/out/weft.%p.out $real_weft "\$@"
EOF
real_bt=$(realpath bench/.tools/bin/boringtun-cli 2>/dev/null || true)
if [ ! -x "$real_bt" ]; then
  # The bench fetches boringtun-cli into bench/.tools on its first run.
  "$dir/weft-bench" small --rounds 1 --pings 20 --secs 0 --paths boringtun --out "$work/fetch.md" >&2
  real_bt=$(realpath bench/.tools/bin/boringtun-cli)
fi
cat >"$work/tools/bin/boringtun-cli" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/out/bt.%p.out $real_bt "\$@"
EOF
chmod +x "$work/bin/weft" "$work/tools/bin/boringtun-cli"

# The first end's profile of each tool: weft's daemon (not its status calls), boringtun-cli.
first() { grep -l -- "$2" "$work"/out/"$1".*.out | sort -t. -k2 -n | head -1; }
for n in 300 1300; do
  rm -f "$work"/out/*
  "$work/bin/weft-bench" small --rounds 1 --pings "$n" --secs 0 --paths weft/1,boringtun \
    --tools "$work/tools" --out "$work/small-$n.md" >"$work/small-$n.log" 2>&1 ||
    { cat "$work/small-$n.log" >&2; exit 1; }
  for tool in weft bt; do
    pattern=$([ $tool = weft ] && echo "cmd: .* run --config" || echo "cmd: ")
    callgrind_annotate --inclusive=no --auto=no --threshold=100 "$(first $tool "$pattern")" \
      >"$work/$tool-$n.txt"
  done
done

# Function costs, "count<TAB>file:function", summed, from callgrind_annotate's table.
costs() {
  sed -nE 's/^ *([0-9,]+) \( *[0-9.]+%\) +(.*)$/\1\t\2/p' "$1" | grep -v 'PROGRAM TOTALS' |
    sed -E 's/ \[[^]]*\]$//' |
    awk -F '\t' '{ c = $1; gsub(",", "", c); sum[$2] += c } END { for (k in sum) print sum[k] "\t" k }' |
    LC_ALL=C sort -t $'\t' -k2
}
per_ping() {
  LC_ALL=C join -t $'\t' -1 2 -2 2 -a 2 -e 0 -o 0,1.1,2.1 \
    <(costs "$work/$1-300.txt") <(costs "$work/$1-1300.txt") |
    awk -F '\t' '{ d = ($3 - $2) / 1000; if (d >= 1) printf "%8.0f  %s\n", d, $1 }' | sort -rn
}
total() { sed -nE 's/^ *([0-9,]+) .*PROGRAM TOTALS.*/\1/p' "$1" | tr -d ,; }
for tool in weft bt; do
  a=$(total "$work/$tool-300.txt") b=$(total "$work/$tool-1300.txt")
  echo "$([ $tool = weft ] && echo weft || echo boringtun-cli): $(((b - a) / 1000)) instructions per ping at one end"
done
echo
echo "weft's top $top (instructions per ping, file:function):"
per_ping weft | head -"$top" |
  sed -E 's#/root/.cargo/registry/src/[^/]+/##; s#/rustc/[0-9a-f]+/##; s#^( +[0-9]+  )/.*/([^/:]+:)#\1\2#'

if [ -n "${HOT_SYMBOLS:-}" ]; then
  # Only the binary's own functions (libc's, the vDSO's cannot be placed), hottest first.
  # Summed per symbol over the source files its code came from; half an instruction per ping
  # or more.
  symbols() { costs "$1" | sed -E 's/\t.*:([^:]+)$/\t\1/' |
    awk -F '\t' '{ sum[$2] += $1 } END { for (k in sum) print sum[k] "\t" k }' |
    LC_ALL=C sort -t $'\t' -k2; }
  LC_ALL=C join -t $'\t' -1 2 -2 2 -a 2 -e 0 -o 0,1.1,2.1 \
    <(symbols "$work/weft-300.txt") <(symbols "$work/weft-1300.txt") |
    awk -F '\t' '{ d = ($3 - $2) / 1000; if (d >= 0.5) printf "%.1f\t%s\n", d, $1 }' |
    sort -rn | cut -f2 |
    grep -Fx -f <(nm --defined-only "$real_weft" | awk '{ print $3 }') >"$HOT_SYMBOLS" ||
    { echo "no symbol of $real_weft found among a ping's functions: $HOT_SYMBOLS left empty" >&2; exit 1; }
  echo
  echo "$(wc -l <"$HOT_SYMBOLS") symbols written to $HOT_SYMBOLS"
fi
