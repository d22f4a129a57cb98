#!/usr/bin/env bash
# Benchmark `kiln build` against bare mmdebstrap, side by side in one run, and
# print ratios (issue: cold build <= 1.25x bare mmdebstrap; overlay-change
# rebuild <= 10% of cold; no-op rebuild <= 2 s; kiln's own peak RSS <= 200 MiB).
# Usage: bench/build.sh [RECIPE]   (default recipes/lb.toml; run as root)
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:-recipes/lb.toml}
cargo build --release -q
kiln=$PWD/target/release/kiln
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a recipes overlays "$work/"
cd "$work"
[ -f "$recipe.lock" ] || "$kiln" lock "$recipe" >/dev/null

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
ratio() { printf '%.3f' "$(echo "$1 / $2" | bc -l)"; }

# 1. Bare mmdebstrap with exactly the arguments kiln uses.
check=$("$kiln" check "$recipe" --json)
sde=$(echo "$check" | python3 -c 'import json,sys; print(json.load(sys.stdin)["source_date_epoch"])')
mapfile -t args < <(echo "$check" | python3 -c 'import json,sys; [print(a) for a in json.load(sys.stdin)["mmdebstrap"]]')
args=("${args[@]/OUT.tar/$work/bare.tar}")
t0=$(now); SOURCE_DATE_EPOCH=$sde mmdebstrap "${args[@]}" >/dev/null 2>&1; t1=$(now)
bare=$(secs "$t0" "$t1"); rm -f "$work/bare.tar"

# 2. Cold kiln build (empty cache), same package set.
export KILN_CACHE=$work/cache KILN_NO_PROGRESS=1
t0=$(now); cold_json=$("$kiln" build "$recipe" --out "$work/images" --no-validate --json); t1=$(now)
cold=$(secs "$t0" "$t1")
cold_rss=$(echo "$cold_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_rss_bytes"])')

# 3. No-op rebuild.
t0=$(now); "$kiln" build "$recipe" --out "$work/images" --no-validate --json >/dev/null; t1=$(now)
noop=$(secs "$t0" "$t1")

# 4. Rebuild after changing one overlay file.
echo "# bench $(date +%s%N)" >> overlays/base/etc/ssh/sshd_config.d/50-kiln.conf
t0=$(now); over_json=$("$kiln" build "$recipe" --out "$work/images" --no-validate --force --json); t1=$(now)
over=$(secs "$t0" "$t1")
over_rss=$(echo "$over_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_rss_bytes"])')

printf '%-40s %10s\n' measure seconds
printf '%-40s %10.2f\n' "bare mmdebstrap" "$bare" "kiln build, cold cache" "$cold" "kiln build, no-op" "$noop" "kiln build, one overlay file changed" "$over"
echo
echo "cold / bare mmdebstrap      = $(ratio "$cold" "$bare")   (target <= 1.25)"
echo "overlay rebuild / cold      = $(ratio "$over" "$cold")   (target <= 0.10)"
echo "no-op rebuild seconds       = $(printf '%.2f' "$noop")   (target <= 2)"
echo "kiln peak RSS, cold build   = $((cold_rss / 1048576)) MiB   (target <= 200)"
echo "kiln peak RSS, rebuild      = $((over_rss / 1048576)) MiB"
