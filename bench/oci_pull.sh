#!/usr/bin/env bash
# bench/oci_pull.sh — kiln::oci::pull against a plain HTTP download, side by side.
#
# Starts Debian's docker-registry on a loopback port, pushes N images (one
# layer of SIZE_MB random bytes each, built with umoci, pushed with skopeo),
# then, in ROUNDS rounds, times:
#   curl  : every blob kiln needs (manifest, config, layers) fetched by one
#           curl process from the same registry into files — sequentially, and
#           with --parallel-max CONCURRENCY; the faster of the two is the baseline;
#   kiln  : a cold-cache pull of the same N images (verifies sha256 while streaming,
#           renames into the cache) with CONCURRENCY workers.
# Prints the best-of-rounds throughputs and their ratio (target: >= 0.80),
# then pulls again with the warm cache and counts the registry requests it
# made (from the registry's access log; target: 0).
#
# The order alternates between rounds so neither side always runs first; the
# load average is printed because other work on the host skews single runs.
#
# Usage: bench/oci_pull.sh            (N=4 SIZE_MB=64 ROUNDS=5 CONCURRENCY=4)
set -euo pipefail
export LC_ALL=C

N=${N:-4}
SIZE_MB=${SIZE_MB:-64}
ROUNDS=${ROUNDS:-5}
CONCURRENCY=${CONCURRENCY:-4}

cd "$(dirname "$0")/.."
for t in docker-registry umoci skopeo curl; do
    command -v "$t" >/dev/null || { echo "missing $t (apt install ${t/curl/curl})" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/kiln-oci-bench.XXXXXX)
REG_PID=
cleanup() {
    if [ -n "$REG_PID" ]; then
        kill "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "== building the bench driver (release)" >&2
DRIVER=$(cargo test --release --test oci_bench --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "oci_bench" and m.get("executable"):
        print(m["executable"])')
[ -x "$DRIVER" ] || { echo "could not build the bench driver (cargo test --release --test oci_bench --no-run)" >&2; exit 2; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
HOST=127.0.0.1:$PORT
cat > "$WORK/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $WORK/data}}
http: {addr: $HOST}
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://$HOST/v2/" >/dev/null && break; sleep 0.1; done

echo "== pushing $N images of $SIZE_MB MiB" >&2
umoci init --layout "$WORK/layout"
REFS=()
URLS=()
for i in $(seq "$N"); do
    umoci new --image "$WORK/layout:img$i"
    umoci unpack --rootless --image "$WORK/layout:img$i" "$WORK/bundle$i" >/dev/null
    head -c "$((SIZE_MB << 20))" /dev/urandom > "$WORK/bundle$i/rootfs/data"
    umoci repack --image "$WORK/layout:img$i" "$WORK/bundle$i"
    rm -rf "$WORK/bundle$i"
    skopeo copy --quiet --dest-tls-verify=false --digestfile "$WORK/d$i" \
        "oci:$WORK/layout:img$i" "docker://$HOST/bench/img$i:v1"
    d=$(cat "$WORK/d$i")
    REFS+=("$HOST/bench/img$i:v1@$d")
    URLS+=("http://$HOST/v2/bench/img$i/manifests/$d")
    for b in $(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "http://$HOST/v2/bench/img$i/manifests/$d" \
            | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["config"]["digest"]); [print(l["digest"]) for l in m["layers"]]'); do
        URLS+=("http://$HOST/v2/bench/img$i/blobs/$b")
    done
done
rm -rf "$WORK/layout"
printf '%s\n' "${URLS[@]}" > "$WORK/urls"

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b) ? a : b }'; }
# One curl process for all URLs (no per-file process start to slow the baseline).
i=0
while read -r u; do
    i=$((i + 1))
    printf 'url = "%s"\noutput = "%s/curl/%d"\n' "$u" "$WORK" "$i"
done < "$WORK/urls" > "$WORK/curl.cfg"
CURL=(curl -sSf -H 'Accept: application/vnd.oci.image.manifest.v1+json' -K "$WORK/curl.cfg")

# Warm the registry's page cache so no contender pays for the first disk read.
xargs -P "$CONCURRENCY" -I{} curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' -o /dev/null {} < "$WORK/urls"

run_curl() {
    rm -rf "$WORK/curl"; mkdir -p "$WORK/curl"; sync
    t0=$(now); "${CURL[@]}"; t1=$(now)
    seq_s=$(calc "$t1 - $t0")
    BYTES=$(find "$WORK/curl" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
    rm -rf "$WORK/curl"; mkdir -p "$WORK/curl"; sync
    t0=$(now); "${CURL[@]}" --parallel --parallel-max "$CONCURRENCY" 2>"$WORK/curl.err"; t1=$(now)
    par_s=$(calc "$t1 - $t0")
}
run_kiln() {
    rm -rf "$WORK/cache"; sync
    reqs0=$(grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true)
    t0=$(now)
    KILN_OCI_BENCH_REFS="${REFS[*]}" KILN_OCI_BENCH_CACHE="$WORK/cache" KILN_OCI_BENCH_CONCURRENCY=$CONCURRENCY \
        "$DRIVER" --ignored --exact bench_driver_pulls_the_images_named_in_env --nocapture >"$WORK/driver.out" 2>&1 \
        || { cat "$WORK/driver.out" >&2; exit 1; }
    t1=$(now)
    kiln_s=$(calc "$t1 - $t0")
    sleep 0.2
    cold_reqs=$(( $(grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true) - reqs0 ))
}

best_curl=999999 best_kiln=999999 BYTES=0
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then run_curl; run_kiln; else run_kiln; run_curl; fi
    printf 'round %d: curl sequential %.3f s, curl x%d %.3f s, kiln pull %.3f s\n' "$r" "$seq_s" "$CONCURRENCY" "$par_s" "$kiln_s"
    best_curl=$(min "$(min "$seq_s" "$par_s")" "$best_curl")
    best_kiln=$(min "$kiln_s" "$best_kiln")
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

KILN_BYTES=$(sed -n 's/.*KILN_OCI_BENCH images=[0-9]* bytes=\([0-9]*\).*/\1/p' "$WORK/driver.out")
[ "$KILN_BYTES" = "$BYTES" ] || echo "note: kiln pulled $KILN_BYTES bytes, curl $BYTES" >&2
curl_mbs=$(calc "$BYTES / 1048576 / $best_curl")
kiln_mbs=$(calc "$BYTES / 1048576 / $best_kiln")
ratio=$(calc "$kiln_mbs / $curl_mbs")
printf 'bytes per run: %d (%d images)\n' "$BYTES" "$N"
printf 'curl (best):  %8.1f MiB/s\n' "$curl_mbs"
printf 'kiln (best):  %8.1f MiB/s\n' "$kiln_mbs"
printf 'throughput ratio kiln/curl: %.2f (target >= 0.80)\n' "$ratio"

# Warm cache: the same pull again must not touch the registry.
before=$(grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true)
KILN_OCI_BENCH_REFS="${REFS[*]}" KILN_OCI_BENCH_CACHE="$WORK/cache" \
    "$DRIVER" --ignored --exact bench_driver_pulls_the_images_named_in_env --nocapture >"$WORK/driver.out" 2>&1 \
    || { cat "$WORK/driver.out" >&2; exit 1; }
sleep 0.2
after=$(grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true)
printf 'warm-cache pull: %d registry requests (target 0; the cold pull made %d)\n' "$((after - before))" "$cold_reqs"
