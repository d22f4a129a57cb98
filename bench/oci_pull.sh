#!/usr/bin/env bash
# bench/oci_pull.sh — kiln::oci::pull against a plain HTTP download, side by side.
#
# Starts Debian's docker-registry on a loopback port, pushes N images (one
# layer of SIZE_MB random bytes each, built with umoci, pushed with skopeo),
# then, in ROUNDS rounds, times:
#   curl  : every blob kiln needs (manifest, config, layers) fetched with curl
#           from the same registry into files — sequentially, and with
#           CONCURRENCY curls at once; the faster of the two is the baseline;
#   kiln  : a cold-cache pull of the same N images (verifies sha256, fsyncs,
#           renames into the cache) with CONCURRENCY workers.
# Prints the best-of-rounds throughputs and their ratio (target: >= 0.80),
# then pulls again with the warm cache and counts the registry requests it
# made (from the registry's access log; target: 0).
#
# Usage: bench/oci_pull.sh            (N=4 SIZE_MB=64 ROUNDS=3 CONCURRENCY=4)
set -euo pipefail

N=${N:-4}
SIZE_MB=${SIZE_MB:-64}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-4}

cd "$(dirname "$0")/.."
for t in docker-registry umoci skopeo curl; do
    command -v "$t" >/dev/null || { echo "missing $t (apt install ${t/curl/curl})" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/kiln-oci-bench.XXXXXX)
REG_PID=
cleanup() {
    [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null && wait "$REG_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "== building the bench driver (release)" >&2
DRIVER=$(cargo test --release --test oci_bench --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
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
fetch_one() { curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' -o "$2/$(echo "$1" | sha256sum | cut -c1-16)" "$1"; }
export -f fetch_one

# Warm the registry's page cache so no contender pays for the first disk read.
xargs -P "$CONCURRENCY" -I{} curl -sf -o /dev/null {} < "$WORK/urls"

best_curl=999999 best_kiln=999999 BYTES=0
for r in $(seq "$ROUNDS"); do
    rm -rf "$WORK/curl"; mkdir -p "$WORK/curl"; sync
    t0=$(now); while read -r u; do fetch_one "$u" "$WORK/curl"; done < "$WORK/urls"; t1=$(now)
    seq_s=$(echo "$t1 - $t0" | bc -l)
    BYTES=$(du -sb --apparent-size "$WORK/curl" | cut -f1)
    rm -rf "$WORK/curl"; mkdir -p "$WORK/curl"; sync
    t0=$(now); xargs -P "$CONCURRENCY" -I{} bash -c 'fetch_one "$1" "$2"' _ {} "$WORK/curl" < "$WORK/urls"; t1=$(now)
    par_s=$(echo "$t1 - $t0" | bc -l)
    rm -rf "$WORK/cache"; sync
    reqs0=$(grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true)
    t0=$(now)
    KILN_OCI_BENCH_REFS="${REFS[*]}" KILN_OCI_BENCH_CACHE="$WORK/cache" KILN_OCI_BENCH_CONCURRENCY=$CONCURRENCY \
        "$DRIVER" --ignored --exact bench_driver_pulls_the_images_named_in_env --nocapture >"$WORK/driver.out" 2>&1 \
        || { cat "$WORK/driver.out" >&2; exit 1; }
    t1=$(now)
    kiln_s=$(echo "$t1 - $t0" | bc -l)
    sleep 0.2
    cold_reqs=$(( $(grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true) - reqs0 ))
    printf 'round %d: curl sequential %.3f s, curl x%d %.3f s, kiln pull %.3f s\n' "$r" "$seq_s" "$CONCURRENCY" "$par_s" "$CONCURRENCY" "$kiln_s"
    for s in $seq_s $par_s; do best_curl=$(echo "if ($s < $best_curl) $s else $best_curl" | bc -l); done
    best_kiln=$(echo "if ($kiln_s < $best_kiln) $kiln_s else $best_kiln" | bc -l)
done

KILN_BYTES=$(sed -n 's/.*KILN_OCI_BENCH images=[0-9]* bytes=\([0-9]*\).*/\1/p' "$WORK/driver.out")
[ "$KILN_BYTES" = "$BYTES" ] || echo "note: kiln pulled $KILN_BYTES bytes, curl $BYTES" >&2
curl_mbs=$(echo "$BYTES / 1048576 / $best_curl" | bc -l)
kiln_mbs=$(echo "$BYTES / 1048576 / $best_kiln" | bc -l)
ratio=$(echo "$kiln_mbs / $curl_mbs" | bc -l)
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
