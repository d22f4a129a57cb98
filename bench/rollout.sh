#!/usr/bin/env bash
# bench/rollout.sh — a blue-green LB replacement with `kiln env apply` on the
# local provider, against `kiln validate` of the same image, side by side in
# one run (TCG): per-slot replacement time / validate time (aim <= 1.3), and
# the VIP's longest gap seen by a probe inside the environment's namespace.
#
# usage: bench/rollout.sh            (run as root: namespaces and taps)
# env: WORK (default: a new /tmp/kiln-bench-rollout.*), KILN_CACHE (default /tmp/kiln-cache)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "bench/rollout.sh: run as root (network namespaces, taps)" >&2; exit 1; }
export KILN_CACHE=${KILN_CACHE:-/tmp/kiln-cache} KILN_NO_PROGRESS=1
cargo build --release --quiet
KILN=$PWD/target/release/kiln
WORK=${WORK:-$(mktemp -d /tmp/kiln-bench-rollout.XXXXXX)}
export KILN_STATE=$WORK/state
ENV=bench$$
PROBE=
cleanup() {
    [[ -n $PROBE ]] && kill "$PROBE" 2>/dev/null || true
    "$KILN" env destroy "$WORK/bench.toml" --yes --accel tcg >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# Two LB images with different ids: the recipe, and one overlay file changed.
cp -a recipes overlays "$WORK/"
(cd "$WORK" && "$KILN" build recipes/lb.toml --no-validate --out a >/dev/null)
echo "# release b" >> "$WORK/overlays/base/etc/ssh/sshd_config.d/50-kiln.conf"
(cd "$WORK" && "$KILN" build recipes/lb.toml --no-validate --out b >/dev/null)

write_env() {
    cat > "$WORK/bench.toml" <<EOF
name = "$ENV"
[provider]
kind = "local"
[network]
cidr = "10.79.0.0/24"
gateway = "10.79.0.1"
vip = "10.79.0.10"
[roles.lb]
recipe = "$WORK/recipes/lb.toml"
image = "$WORK/$1/lb/0.1.0"
cores = 1
memory = 1024
skip_checks = ["backend servers come from user-data, every address of the pool", "unicast peers are the pools but this node's own address", "haproxy counts only a backend serving TLS"]
[roles.lb.values]
backends = [{ name = "server-1", addresses = ["10.79.0.31"] }]
[[roles.lb.slots]]
name = "lb-1"
addresses = ["10.79.0.11", "10.79.0.21"]
values = { priority = 150 }
[[roles.lb.slots]]
name = "lb-2"
addresses = ["10.79.0.12", "10.79.0.22"]
values = { priority = 100 }
[[checks]]
name = "the VIP answers on the API port"
tcp = "vip:6443"
EOF
}

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

# 1. kiln validate of the new image (one boot, TCG).
t0=$(now); "$KILN" validate "$WORK/b/lb/0.1.0" --accel tcg --no-record >/dev/null; t1=$(now)
validate=$(secs "$t0" "$t1")

# 2. Bootstrap with image a, then replace both slots with image b while a
#    probe inside the namespace connects to VIP:6443 every 100 ms.
write_env a
"$KILN" env apply "$WORK/bench.toml" --yes --accel tcg >/dev/null
ip netns exec "kiln-$ENV" bash -c '
  last=$(date +%s.%N); gap=0; ok=0; fail=0
  trap "echo \$ok \$fail \$gap > '"$WORK"'/probe; exit 0" TERM
  while :; do
    if timeout 3 bash -c "exec 3<>/dev/tcp/10.79.0.10/6443" 2>/dev/null; then
      now=$(date +%s.%N); g=$(echo "$now - $last" | bc -l)
      gap=$(echo "if ($g > $gap) $g else $gap" | bc -l); last=$now; ok=$((ok+1))
    else fail=$((fail+1)); fi
    sleep 0.1
  done' &
PROBE=$!
sleep 2
write_env b
t0=$(now); "$KILN" env apply "$WORK/bench.toml" --yes --accel tcg >/dev/null; t1=$(now)
sleep 2
kill "$PROBE"; wait "$PROBE" 2>/dev/null || true; PROBE=
rollout=$(secs "$t0" "$t1")
read -r ok fail gap < "$WORK/probe"
per_slot=$(echo "$rollout / 2" | bc -l)

printf '%-44s %10s\n' measure seconds
printf '%-44s %10.1f\n' "kiln validate (new LB image, TCG)" "$validate" \
    "kiln env apply, 2 LB slots replaced" "$rollout" "  per slot" "$per_slot"
echo
echo "per-slot replacement / validate = $(printf '%.2f' "$(echo "$per_slot / $validate" | bc -l)")   (aim <= 1.3)"
echo "VIP probes: $ok answered, $fail failed; longest gap $(printf '%.2f' "$gap") s"
