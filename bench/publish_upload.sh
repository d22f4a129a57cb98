#!/usr/bin/env bash
# bench/publish_upload.sh: kiln publish's upload against `curl -F` to the same
# pve-sim endpoint on loopback (throughput ratio), and kiln's peak RSS while
# uploading a 2 GiB sparse image. pve-sim (crates/pve-sim) is a Proxmox VE
# stand-in, not Proxmox.
#
# Targets (issue 5): kiln throughput >= 90 % of curl; kiln peak RSS <= 100 MiB.
# Usage: bench/publish_upload.sh [SIZE_GIB=2] [ROUNDS=3]
# Needs: curl, python3, GNU time (/usr/bin/time, apt install time), sha256sum.
set -euo pipefail

SIZE_GIB=${1:-2}
ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

for tool in curl python3 sha256sum; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "missing /usr/bin/time (apt install time)" >&2; exit 1; }

cargo build --release --quiet --bin kiln --bin pve-sim
KILN=$ROOT/target/release/kiln
SIM=$ROOT/target/release/pve-sim

WORK=$(mktemp -d /tmp/kiln-bench-publish.XXXXXX)
SIM_PID=
cleanup() {
  if [ -n "$SIM_PID" ]; then kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true; fi
  rm -rf "$WORK" "${SIM_DATA:-}"
}
trap cleanup EXIT INT TERM

# A throwaway token for the simulator only; kept out of argv (env and a header file).
SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export PVE_SIM_TOKEN="bench@pve!kiln=$SECRET"
printf 'Authorization: PVEAPIToken=%s\n' "$PVE_SIM_TOKEN" > "$WORK/auth.hdr"
chmod 600 "$WORK/auth.hdr"

# The image: a sparse raw disk plus a manifest kiln accepts.
IMG=$WORK/images/bench/1.0.0
mkdir -p "$IMG"
truncate -s "${SIZE_GIB}G" "$IMG/disk.raw"
BYTES=$(stat -c %s "$IMG/disk.raw")
echo "hashing the ${SIZE_GIB} GiB image..."
SUM=$(sha256sum "$IMG/disk.raw" | cut -d' ' -f1)
python3 - "$IMG" "$SUM" "$BYTES" <<'PY'
import json, sys
d, s, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = {
  "name": "bench", "version": "1.0.0", "id": s, "kiln_version": "bench",
  "disk": {"file": "disk.raw", "format": "raw", "sha256": s, "size": n,
           "virtual_size": n, "root_fs_uuid": "00000000-0000-4000-8000-000000000000"},
  "inputs": {"recipe": "", "lock": "", "artifacts": {}, "images": {},
             "base_rootfs_key": "", "base_rootfs": "", "overlays": {}},
  "source_date_epoch": 0,
  "boot": {"uefi": True, "secure_boot": True, "bios": False, "kernel": "bench", "cmdline": ""},
  "packages": {}, "hygiene": {"cleaned": [], "allowed": [], "violations": []},
  "stages": [], "roles": [], "validate": {"role": None, "user_data": None, "checks": []},
}
json.dump(m, open(d + "/manifest.json", "w"), indent=2)
PY
printf '%s  disk.raw\n' "$SUM" > "$IMG/SHA256SUMS"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The simulator stores uploads in tmpfs when there is room, so page-cache
# writeback throttling of the disk does not decide the race.
SIM_DATA=$WORK/sim
if [ "$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)" -gt $((3 * SIZE_GIB * 1024 * 1024)) ]; then
  SIM_DATA=$(mktemp -d /dev/shm/kiln-bench-sim.XXXXXX)
fi
"$SIM" --listen "127.0.0.1:$PORT" --data-dir "$SIM_DATA" --task-seconds 0.05 > "$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 50); do grep -q listening "$WORK/sim.log" && break; sleep 0.1; done
URL="http://127.0.0.1:$PORT"

export KILN_PVE_URL=$URL KILN_PVE_NODE=pve KILN_PVE_STORAGE=local-lvm \
       KILN_PVE_IMPORT_STORAGE=local KILN_PVE_TOKEN=$PVE_SIM_TOKEN KILN_NO_PROGRESS=1

run_curl() {
  t_curl=$(curl -sS -o "$WORK/curl.out" -w '%{time_total}' -H @"$WORK/auth.hdr" \
    -F content=import -F "filename=@$IMG/disk.raw;filename=curl-bench.raw" \
    "$URL/api2/json/nodes/pve/storage/local/upload")
  grep -q UPID "$WORK/curl.out" || { echo "curl upload failed: $(cat "$WORK/curl.out")" >&2; exit 1; }
}
run_kiln() {
  # A full publish; its JSON reports the upload request's own wall time.
  /usr/bin/time -v -o "$WORK/time.txt" "$KILN" publish "$IMG" --allow-unvalidated --json > "$WORK/kiln.json"
  t_kiln=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["upload_seconds"])' "$WORK/kiln.json")
  rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$WORK/time.txt")
  # Remove the template so the next round uploads again.
  "$KILN" templates prune --keep 0 > /dev/null
}

best_curl=0
best_kiln=0
ratios=""
max_rss_kb=0
for r in $(seq "$ROUNDS"); do
  # Alternate the order so neither side always runs on a warmer machine.
  if [ $((r % 2)) -eq 1 ]; then run_curl; run_kiln; else run_kiln; run_curl; fi
  mbps_curl=$(python3 -c "print($BYTES/$t_curl/2**20)")
  mbps_kiln=$(python3 -c "print($BYTES/$t_kiln/2**20)")
  printf 'round %d: curl %.0f MiB/s (%.2f s), kiln %.0f MiB/s (%.2f s), kiln peak RSS %d MiB\n' \
    "$r" "$mbps_curl" "$t_curl" "$mbps_kiln" "$t_kiln" $((rss / 1024))
  ratios="$ratios $(python3 -c "print($mbps_kiln/$mbps_curl)")"
  best_curl=$(python3 -c "print(max($best_curl, $mbps_curl))")
  best_kiln=$(python3 -c "print(max($best_kiln, $mbps_kiln))")
  [ "$rss" -gt "$max_rss_kb" ] && max_rss_kb=$rss
done

ratio=$(python3 -c "print(round($best_kiln/$best_curl, 3))")
echo "upload ${SIZE_GIB} GiB over loopback, best of $ROUNDS:"
printf '  curl -F: %.0f MiB/s\n  kiln:    %.0f MiB/s\n' "$best_curl" "$best_kiln"
median=$(python3 -c "import statistics,sys; print(round(statistics.median(map(float, sys.argv[1:])), 3))" $ratios)
echo "  throughput ratio kiln/curl: $ratio best-of, $median median of per-round ratios (target >= 0.90)"
echo "  kiln peak RSS: $((max_rss_kb / 1024)) MiB for a $((BYTES >> 20)) MiB image (target <= 100 MiB)"
