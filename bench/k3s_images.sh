#!/usr/bin/env bash
# bench/k3s_images.sh — `kiln build` of an image with baked container images:
# a cold build (images pulled from the registry) against a second build whose
# image blobs are cached, side by side in one run.
#
# Starts Debian's docker-registry on a loopback port, pushes N images (one
# layer of SIZE_MB random bytes each, umoci + skopeo), writes a recipe that
# extends recipes/base.toml with those images, locks it, then builds it twice
# into different output directories with the same $KILN_CACHE:
#   cold : the OCI blob cache is empty: every blob comes from the registry;
#   warm : the same inputs again: every blob is in the cache.
# Prints the registry requests each build made (from the registry's access
# log; target for warm: 0), the `images` stage time of each and their ratio,
# and the whole build times. The base rootfs comes from $KILN_CACHE (the first
# run of the script pays for mmdebstrap once; it is not part of the ratio).
#
# Usage: bench/k3s_images.sh     (N=5 SIZE_MB=32; KILN=path/to/kiln, default
#                                 target/release/kiln, built if missing)
set -euo pipefail
export LC_ALL=C

N=${N:-5}
SIZE_MB=${SIZE_MB:-32}
export KILN_CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
export KILN_NO_PROGRESS=1

cd "$(dirname "$0")/.."
ROOT=$PWD
for t in docker-registry umoci skopeo curl python3; do
    command -v "$t" >/dev/null || { echo "missing $t (apt install $t)" >&2; exit 2; }
done
KILN=${KILN:-$ROOT/target/release/kiln}
# mkfs.ext4 (libarchive) needs a UTF-8 locale to read non-ASCII paths in the
# rootfs tar; this script itself runs under LC_ALL=C for its number formats.
kiln() { LC_ALL=C.UTF-8 "$KILN" "$@"; }
if [ ! -x "$KILN" ]; then
    echo "== building kiln (release)" >&2
    cargo build --release --quiet
fi

WORK=$(mktemp -d /tmp/kiln-k3s-images-bench.XXXXXX)
REG_PID=
cleanup() {
    if [ -n "$REG_PID" ]; then
        kill "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
HOST=127.0.0.1:$PORT
cat > "$WORK/registry.yml" <<EOF
version: 0.1
log: {level: info}
storage: {filesystem: {rootdirectory: $WORK/data}}
http: {addr: $HOST}
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -sf "http://$HOST/v2/" >/dev/null && break; sleep 0.1; done

echo "== pushing $N images of $SIZE_MB MiB" >&2
umoci init --layout "$WORK/layout"
IMAGES=""
for i in $(seq "$N"); do
    umoci new --image "$WORK/layout:img$i"
    umoci unpack --rootless --image "$WORK/layout:img$i" "$WORK/bundle$i" >/dev/null
    head -c "$((SIZE_MB << 20))" /dev/urandom > "$WORK/bundle$i/rootfs/data"
    umoci repack --image "$WORK/layout:img$i" "$WORK/bundle$i"
    rm -rf "$WORK/bundle$i"
    skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/layout:img$i" "docker://$HOST/bench/img$i:v1"
    IMAGES="$IMAGES\"$HOST/bench/img$i:v1\", "
done
rm -rf "$WORK/layout"

# The project: the real recipes and overlays, plus the bench recipe. The
# tiny recipe's lock (when present) keeps the base rootfs cache key, so an
# existing cached base is reused.
mkdir -p "$WORK/project"
cp -r recipes overlays "$WORK/project/"
cat > "$WORK/project/recipes/bench-images.toml" <<EOF
# bench/k3s_images.sh: the shared base plus $N loopback images.
extends = "base.toml"
name = "bench-images"
version = "0.1.0"
images = [ $IMAGES ]
[base]
packages = ["iputils-ping"]
[disk]
size = "4G"
EOF
[ -f recipes/tiny.toml.lock ] && cp recipes/tiny.toml.lock "$WORK/project/recipes/bench-images.toml.lock"
cd "$WORK/project"
kiln lock recipes/bench-images.toml >/dev/null

requests() { grep -c '"\(GET\|HEAD\) /v2/' "$WORK/registry.log" || true; }
images_stage() { python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(next(s["seconds"] for s in m["stages"] if s["stage"]=="images"))' "$1"; }
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }

# Cold: no image blob cached (the rest of the cache is kept).
rm -rf "$KILN_CACHE/oci"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
r0=$(requests)
t0=$(date +%s.%N)
kiln build recipes/bench-images.toml --no-validate --out "$WORK/out-cold" --json > "$WORK/cold.json"
t1=$(date +%s.%N)
sleep 0.2
cold_reqs=$(( $(requests) - r0 ))
cold_total=$(calc "$t1 - $t0")
cold_images=$(images_stage "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifest"])' "$WORK/cold.json")")

# Warm: the same inputs, another output directory so it really builds.
r0=$(requests)
t0=$(date +%s.%N)
kiln build recipes/bench-images.toml --no-validate --out "$WORK/out-warm" --json > "$WORK/warm.json"
t1=$(date +%s.%N)
sleep 0.2
warm_reqs=$(( $(requests) - r0 ))
warm_total=$(calc "$t1 - $t0")
warm_images=$(images_stage "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifest"])' "$WORK/warm.json")")
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

printf 'images: %d x %d MiB\n' "$N" "$SIZE_MB"
printf 'cold build: %6.2f s total, images stage %6.2f s, %d registry requests\n' "$cold_total" "$cold_images" "$cold_reqs"
printf 'warm build: %6.2f s total, images stage %6.2f s, %d registry requests (target 0)\n' "$warm_total" "$warm_images" "$warm_reqs"
printf 'images stage warm/cold: %.2f\n' "$(calc "$warm_images / ($cold_images > 0 ? $cold_images : 0.001)")"
printf 'same image id: %s\n' "$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); print("yes" if a["id"]==b["id"] else "NO")' "$WORK/cold.json" "$WORK/warm.json")"
