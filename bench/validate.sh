#!/usr/bin/env bash
# bench/validate.sh — `kiln validate` wall time against a bare
# qemu-system-x86_64 boot of the same image to cloud-init done, measured side
# by side in one run (TCG), printed as a ratio; plus kiln's boot-to-SSH and
# boot-to-cloud-init-done seconds. Target: ratio <= 1.15.
#
# usage: bench/validate.sh [IMAGE_DIR]
#   Without IMAGE_DIR, builds $RECIPE (default recipes/lb.toml, the image the
#   issue's boot-time targets are about) with `kiln build --no-validate` into $OUT.
# env: RECIPE, OUT (default /tmp/kiln-bench), KILN_CACHE (default /tmp/kiln-cache)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/kiln-bench}
export KILN_CACHE=${KILN_CACHE:-/tmp/kiln-cache}
export KILN_NO_PROGRESS=1
cargo build --release --quiet
KILN=$PWD/target/release/kiln

if [[ $# -ge 1 ]]; then
    IMAGE=$(realpath "$1")
else
    RECIPE=${RECIPE:-recipes/lb.toml}
    echo "building $RECIPE (no validation) into $OUT" >&2
    "$KILN" build "$RECIPE" --no-validate --out "$OUT" >&2
    IMAGE=$(dirname "$(ls -t $(find "$OUT" -name manifest.json) | head -1)")
fi
[[ -f $IMAGE/manifest.json ]] || { echo "error: $IMAGE is not a kiln image (no manifest.json)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/kiln-bench-validate.XXXXXX)
QEMU_PID=
cleanup() {
    [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

read -r DISK FORMAT VSIZE USER_DATA_FILE < <(python3 - "$IMAGE" "$WORK" <<'PY'
import json, sys, os
img, work = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(img, "manifest.json")))
ud = m["validate"].get("user_data") or "#cloud-config\n{}\n"
open(os.path.join(work, "user-data"), "w").write(ud)
print(os.path.join(img, m["disk"]["file"]), m["disk"]["format"], m["disk"]["virtual_size"], os.path.join(work, "user-data"))
PY
)

cat "$DISK" > /dev/null   # same warm page cache for every run

# The bare boot starts the same machine kiln validate starts and stops at
# cloud-init done. Other load on the host skews single runs, so ROUNDS
# (default 1) alternates which of the two goes first; totals give the ratio.
bare_boot() {
    rm -f "$WORK/seed.img" "$WORK/overlay.qcow2" "$WORK/serial.log"
    printf 'instance-id: bench-%s\nlocal-hostname: bench\n' "$RANDOM" > "$WORK/meta-data"
    mkfs.vfat -n CIDATA -C "$WORK/seed.img" 4096 >/dev/null
    MTOOLS_SKIP_CHECK=1 mcopy -i "$WORK/seed.img" "$WORK/user-data" "$WORK/meta-data" ::
    cp /usr/share/OVMF/OVMF_VARS_4M.ms.fd "$WORK/vars.fd"
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

    start=$(date +%s.%N)
    qemu-img create -q -f qcow2 -F "$FORMAT" -b "$DISK" "$WORK/overlay.qcow2" $((VSIZE + (1<<30)))
    qemu-system-x86_64 -name bench -nodefaults -no-user-config -display none \
        -machine q35,smm=on -global driver=cfi.pflash01,property=secure,value=on -global ICH9-LPC.disable_s3=1 \
        -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd \
        -drive if=pflash,format=raw,unit=1,file="$WORK/vars.fd" \
        -accel tcg,tb-size=256 -cpu max -m 2048 -smp 2 \
        -device virtio-scsi-pci,id=scsi0 \
        -drive if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap,file="$WORK/overlay.qcow2" \
        -device scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1 \
        -device virtio-scsi-pci,id=scsi1 -drive if=none,id=seed,format=raw,readonly=on,file="$WORK/seed.img" \
        -device scsi-hd,drive=seed,bus=scsi1.0 \
        -netdev user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-:22 -device virtio-net-pci,netdev=n0 \
        -device virtio-rng-pci -device pvpanic -serial file:"$WORK/serial.log" &
    QEMU_PID=$!
    until grep -qa 'Cloud-init v\. .* finished' "$WORK/serial.log" 2>/dev/null; do
        kill -0 "$QEMU_PID" 2>/dev/null || { echo "error: bare QEMU exited early" >&2; exit 1; }
        (( $(date +%s) - ${start%.*} < 900 )) || { echo "error: bare boot never reached cloud-init done" >&2; tail -50 "$WORK/serial.log" >&2; exit 1; }
        sleep 0.2
    done
    bare_end=$(date +%s.%N)
    kill "$QEMU_PID"; wait "$QEMU_PID" 2>/dev/null || true; QEMU_PID=
    bare=$(echo "$bare_end - $start" | bc -l)
    echo "round $round: bare boot to cloud-init done $bare s" >&2
}

kiln_validate() {
    start=$(date +%s.%N)
    status=passed
    "$KILN" validate "$IMAGE" --accel tcg --no-record --json > "$WORK/validate.json" || status=FAILED
    kiln_end=$(date +%s.%N)
    wall=$(echo "$kiln_end - $start" | bc -l)
    echo "round $round: kiln validate $wall s ($status)" >&2
}

ROUNDS=${ROUNDS:-1}
bare_total=0; wall_total=0
for round in $(seq 1 "$ROUNDS"); do
    if (( round % 2 )); then bare_boot; kiln_validate; else kiln_validate; bare_boot; fi
    bare_total=$(echo "$bare_total + $bare" | bc -l)
    wall_total=$(echo "$wall_total + $wall" | bc -l)
done
bare=$(echo "$bare_total / $ROUNDS" | bc -l)
wall=$(echo "$wall_total / $ROUNDS" | bc -l)

read -r SSH CI < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["images"][0]["record"]; print(r["boot_to_ssh_seconds"] or "nan", r["boot_to_cloud_init_seconds"] or "nan")' "$WORK/validate.json")
printf 'image                              %s (validation %s)\n' "$IMAGE" "$status"
printf 'bare qemu boot to cloud-init done  %7.1f s (mean of %s)\n' "$bare" "$ROUNDS"
printf 'kiln validate wall time            %7.1f s (mean of %s)\n' "$wall" "$ROUNDS"
printf 'kiln boot to SSH                   %7.1f s (last round)\n' "$SSH"
printf 'kiln boot to cloud-init done       %7.1f s (last round)\n' "$CI"
printf 'ratio validate / bare              %7.2f   (target <= 1.15)\n' "$(echo "$wall / $bare" | bc -l)"
