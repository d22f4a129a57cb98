//! Disk: assemble a GPT disk (EFI system partition + ext4 root) from the final
//! rootfs tar without loop devices or mounts, then convert it to qcow2.
//!
//! The ESP holds shim (as the removable-media `BOOTX64.EFI`), Debian's signed
//! grub and a `grub.cfg` that finds the root by filesystem UUID and boots the
//! signed kernel from it, so the disk boots with Secure Boot enforced on OVMF
//! with Microsoft keys enrolled (Proxmox's `pre-enrolled-keys=1`).
//! With `[boot] bios = true` the disk is hybrid, as cloud images are: a BIOS
//! boot partition after the ESP holds GRUB's core.img (see [`bios`]) and the
//! protective MBR its boot.img, so SeaBIOS boots it too; the root stays last.

pub mod bios;
pub(crate) mod boot;
pub(crate) mod fat;

pub use crate::image::inputs::Identities;

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::util::locks::LockedDir;

const MIB: u64 = 1 << 20;
/// GPT needs 33 sectors at the end for the backup header and table.
const GPT_TAIL: u64 = MIB;

pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Linux root (x86-64), as the Discoverable Partitions Specification names it.
pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// GRUB's BIOS boot partition ("Hah!IdontNeedEFI").
pub const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
/// Size of the BIOS boot partition: room for any core.img diskboot can load.
pub const BIOS_BOOT_SIZE: u64 = MIB;

/// Where the partitions go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    pub size: u64,
    pub esp_start: u64,
    pub esp_size: u64,
    /// The BIOS boot partition (start, size) of a hybrid disk, right after the ESP.
    pub bios_boot: Option<(u64, u64)>,
    pub root_start: u64,
    pub root_size: u64,
}

impl Layout {
    /// Partitions in disk order: ESP, the BIOS boot partition when `bios`, root
    /// (last, so it can grow into the VM's disk at first boot).
    pub fn new(size: u64, esp_size: u64, bios: bool) -> Result<Layout> {
        let esp_size = esp_size.div_ceil(MIB) * MIB;
        let size = size.div_ceil(MIB) * MIB;
        let esp_start = MIB;
        let bios_boot = bios.then_some((esp_start + esp_size, BIOS_BOOT_SIZE));
        let root_start = esp_start + esp_size + bios_boot.map_or(0, |(_, s)| s);
        if size < root_start + GPT_TAIL + 64 * MIB {
            bail!(
                "disk.size {} is too small for a {} ESP and a root filesystem",
                crate::util::human_bytes(size),
                crate::util::human_bytes(esp_size)
            );
        }
        Ok(Layout {
            size,
            esp_start,
            esp_size,
            bios_boot,
            root_start,
            root_size: size - root_start - GPT_TAIL,
        })
    }
}

/// Everything the boot path needs, read from the rootfs.
pub struct BootFiles {
    pub shim: Vec<u8>,
    pub grub: Vec<u8>,
    pub mok_manager: Option<Vec<u8>>,
    /// GRUB's boot.img and core.img for hybrid disks (`[boot] bios = true`).
    pub bios: Option<bios::BiosBoot>,
    /// e.g. `6.1.0-50-amd64`
    pub kernel_version: String,
}

/// Paths in the rootfs the ESP is made from.
pub const SHIM: &str = "usr/lib/shim/shimx64.efi.signed";
pub const MOK_MANAGER: &str = "usr/lib/shim/mmx64.efi.signed";
pub const GRUB_SIGNED: &str = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";

/// The kernel command line kiln boots with.
pub fn cmdline(ids: &Identities, extra: &str) -> String {
    let mut c = format!(
        "root=UUID={} ro console=tty0 console=ttyS0,115200n8",
        ids.root_fs_uuid
    );
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// grub.cfg beside the signed grub on the ESP: find the root by UUID and boot
/// the signed kernel from /boot there.
pub fn grub_cfg(ids: &Identities, kernel_version: &str, cmdline: &str) -> String {
    format!(
        "# Written by kiln: boot the signed kernel from the root filesystem.\n\
         set timeout=0\n\
         search --no-floppy --fs-uuid --set=root {uuid}\n\
         linux /boot/vmlinuz-{kv} {cmdline}\n\
         initrd /boot/initrd.img-{kv}\n\
         boot\n",
        uuid = ids.root_fs_uuid,
        kv = kernel_version,
    )
}

/// The sfdisk script for `layout`. Without a BIOS boot partition it is exactly
/// the UEFI-only table kiln has always written (same bytes for those images).
fn gpt_script(layout: &Layout, ids: &Identities) -> String {
    let mut script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\
         start={}, size={}, type={ESP_TYPE}, uuid={}, name=\"esp\"\n",
        ids.disk_guid,
        layout.esp_start / 512,
        layout.esp_size / 512,
        ids.esp_guid,
    );
    if let Some((start, size)) = layout.bios_boot {
        script.push_str(&format!(
            "start={}, size={}, type={BIOS_BOOT_TYPE}, uuid={}, name=\"bios\"\n",
            start / 512,
            size / 512,
            ids.bios_guid,
        ));
    }
    script.push_str(&format!(
        "start={}, size={}, type={ROOT_TYPE}, uuid={}, name=\"root\"\n",
        layout.root_start / 512,
        layout.root_size / 512,
        ids.root_guid,
    ));
    script
}

/// Write the partition table with sfdisk (works on a plain file).
fn write_gpt(raw: &Path, layout: &Layout, ids: &Identities) -> Result<()> {
    let script = gpt_script(layout, ids);
    let mut child = Command::new(crate::util::hosttools::path_of(
        crate::util::hosttools::SFDISK,
    )?)
    .args([
        "--quiet",
        "--no-reread",
        "--no-tell-kernel",
        "--wipe",
        "always",
    ])
    .arg(raw)
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .context("cannot start sfdisk")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "sfdisk failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Everything the raw disk is made from.
pub struct DiskInputs<'a> {
    pub layout: &'a Layout,
    pub ids: &'a Identities,
    pub boot: &'a BootFiles,
    /// The kernel command line (see [`cmdline`]).
    pub cmdline: &'a str,
    /// The final rootfs tar, for `mkfs.ext4 -d`.
    pub rootfs_tar: &'a Path,
    pub epoch: u64,
    /// Bytes of file data in the rootfs (for the size check).
    pub data_bytes: u64,
}

/// Build the raw disk: GPT, ESP (in-process FAT), ext4 root filled from
/// the rootfs tar by `mkfs.ext4 -d` at the partition's offset.
pub fn assemble(raw: &Path, d: &DiskInputs<'_>) -> Result<()> {
    let DiskInputs {
        layout,
        ids,
        boot,
        cmdline,
        rootfs_tar,
        epoch,
        data_bytes,
    } = *d;
    // A quick, certain refusal before mkfs tries: file data alone exceeds the root.
    if data_bytes > layout.root_size {
        return Err(too_big(data_bytes, layout));
    }
    let mut f = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(raw)
        .with_context(|| format!("cannot create {}", raw.display()))?;
    f.set_len(layout.size)?;
    write_gpt(raw, layout, ids)?;

    let mut files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_string(), boot.shim.clone()),
        ("EFI/BOOT/grubx64.efi".to_string(), boot.grub.clone()),
        (
            "EFI/BOOT/grub.cfg".to_string(),
            grub_cfg(ids, &boot.kernel_version, cmdline).into_bytes(),
        ),
    ];
    if let Some(mm) = &boot.mok_manager {
        files.push(("EFI/BOOT/mmx64.efi".to_string(), mm.clone()));
    }
    crate::image::disk::fat::write_volume(
        &mut f,
        layout.esp_start,
        layout.esp_size,
        "ESP",
        ids.esp_volume_id,
        epoch,
        &files,
    )
    .context("cannot write the EFI system partition")?;
    match (&boot.bios, layout.bios_boot) {
        (Some(b), Some((start, size))) => {
            bios::install(&mut f, b, start, size).context("cannot install GRUB for BIOS boot")?
        }
        (None, None) => {}
        _ => bail!("BIOS boot needs both GRUB's images and a BIOS boot partition"),
    }
    f.sync_all()?;
    drop(f);

    // Minutes of work for nothing once kiln is gone: it dies with kiln
    // (spawned and waited for on this thread).
    let out = crate::util::locks::die_with_parent(
        &mut Command::new(crate::util::hosttools::path_of(
            crate::util::hosttools::MKFS_EXT4,
        )?),
        libc::SIGKILL,
    )
    .env("SOURCE_DATE_EPOCH", epoch.to_string())
    .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
    .env("MKE2FS_DEVICE_SECTSIZE", "512")
    // libarchive needs a UTF-8 locale to read non-ASCII member names.
    .env("LC_ALL", "C.UTF-8")
    .args([
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        "root",
        "-b",
        "4096",
        "-O",
        "^metadata_csum_seed",
    ])
    .arg("-U")
    .arg(&ids.root_fs_uuid)
    // The raw file is new and sparse, so it reads as zeros: mkfs need not
    // write zeros over inode tables and the journal (the same bytes, with
    // holes the qcow2 writer skips).
    .arg("-E")
    .arg(format!(
        "offset={},hash_seed={},nodiscard,lazy_itable_init=0,assume_storage_prezeroed=1",
        layout.root_start, ids.root_fs_uuid
    ))
    .arg("-d")
    .arg(rootfs_tar)
    .arg(raw)
    .arg(format!("{}k", layout.root_size / 1024))
    .stdin(Stdio::null())
    .output()
    .context("cannot run mkfs.ext4")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let host = raw.parent().and_then(statfs);
        let written = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(raw).map_or(0, |m| m.blocks() * 512)
        };
        return Err(mkfs_error(
            err.trim(),
            raw,
            host,
            written,
            layout,
            data_bytes,
        ));
    }
    Ok(())
}

/// Less than this left free on the filesystem holding the raw disk after
/// mkfs ran out of space means that filesystem (the host's), not the image,
/// is full: a write that fails with ENOSPC there leaves it with less free
/// than the failed write (mke2fs writes at most a few MiB at once).
const HOST_FULL_SLACK: u64 = 16 * MIB;

/// What mkfs.ext4 prints when it runs out of space: in the image, libext2fs's
/// allocation errors (lib/ext2fs/ext2_err.et.in: EXT2_ET_BLOCK_ALLOC_FAIL,
/// EXT2_ET_INODE_ALLOC_FAIL, EXT2_ET_DIR_NO_SPACE); on the host, ENOSPC from
/// write(2) on the raw file ("No space left on device") or a partial write
/// (EXT2_ET_SHORT_WRITE, from lib/ext2fs/unix_io.c).
const MKFS_NO_SPACE: [&str; 5] = [
    "Could not allocate block",
    "Could not allocate inode",
    "No free space in the directory",
    "No space left",
    "short write",
];

/// About how much the raw disk occupies on the filesystem holding it once
/// written (it is sparse): the partitions before the root, the root's file
/// data and an eighth more for ext4's metadata.
pub fn scratch_need(layout: &Layout, data_bytes: u64) -> u64 {
    layout.root_start + data_bytes + data_bytes / 8
}

/// Why mkfs.ext4 failed, from its stderr `err`; `host` is the filesystem
/// holding `raw` just after the failure and `written` what `raw` occupies on
/// it. Out of space with that filesystem (nearly) full is the host's fault,
/// whatever mkfs's wording (the host's ENOSPC can also show as a short write
/// or pass through libext2fs's messages): the disk size is blamed only when
/// the host still has room.
fn mkfs_error(
    err: &str,
    raw: &Path,
    host: Option<FsStat>,
    written: u64,
    layout: &Layout,
    data_bytes: u64,
) -> anyhow::Error {
    if MKFS_NO_SPACE.iter().any(|m| err.contains(m)) {
        let dir = raw.parent().unwrap_or(raw);
        return match host.filter(|h| h.free < HOST_FULL_SLACK) {
            Some(h) => {
                let need = scratch_need(layout, data_bytes);
                let in_ram = raw.starts_with(RAM_DIR);
                anyhow::anyhow!(
                    "the host filesystem holding {} ({}) is full, not the image: {} free, \
                     the raw disk needs about {} there ({} written so far): \
                     free {} more on it{} ({})",
                    dir.display(),
                    if in_ram {
                        "the RAM scratch tmpfs"
                    } else if h.fs_type == TMPFS_MAGIC {
                        "the kiln cache, a tmpfs"
                    } else {
                        "the kiln cache"
                    },
                    crate::util::human_bytes(h.free),
                    crate::util::human_bytes(need),
                    crate::util::human_bytes(written),
                    crate::util::human_bytes(need.saturating_sub(written)),
                    if in_ram {
                        ", or set KILN_RAM_SCRATCH=0 to write it in the cache"
                    } else {
                        ""
                    },
                    err.lines().last().unwrap_or(err),
                )
            }
            None => too_big(data_bytes, layout),
        };
    }
    if err.contains("libarchive") || err.contains("tarball") {
        return anyhow::anyhow!("mkfs.ext4 cannot read the rootfs tarball: {err} (install e2fsprogs >= 1.47.1 and libarchive13)");
    }
    anyhow::anyhow!("mkfs.ext4 failed: {err}")
}

/// Where RAM-backed scratch goes: Debian mounts a tmpfs there.
const RAM_DIR: &str = "/dev/shm";
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAM_PREFIX: &str = "kiln-";

/// A scratch directory in RAM for a raw disk that will hold about `need`
/// bytes, when the tmpfs and the machine's available memory both have at
/// least twice that to spare (plus 1 GiB of memory). `None` means use disk.
/// `KILN_RAM_SCRATCH=0` turns it off. Directories of killed builds (whose
/// lock nobody holds) are removed first, so a crash never pins memory for long.
pub fn ram_scratch(need: u64) -> Option<LockedDir> {
    // First, or a killed build's leftover could itself leave too little room.
    crate::util::locks::sweep(Path::new(RAM_DIR), RAM_PREFIX, false);
    if std::env::var_os("KILN_RAM_SCRATCH").is_some_and(|v| v == "0") {
        return None;
    }
    ram_dir(Path::new(RAM_DIR), need, mem_available())
}

fn ram_dir(root: &Path, need: u64, mem_available: Option<u64>) -> Option<LockedDir> {
    let st = statfs(root)?;
    if st.fs_type != TMPFS_MAGIC
        || st.free < need.saturating_mul(2)
        || mem_available? < need.saturating_mul(2) + (1 << 30)
    {
        return None;
    }
    LockedDir::new_in(root, &format!("{RAM_PREFIX}{}-", std::process::id())).ok()
}

#[derive(Debug, Clone)]
struct FsStat {
    fs_type: i64,
    free: u64,
}

fn statfs(path: &Path) -> Option<FsStat> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(FsStat {
        fs_type: st.f_type as i64,
        free: st.f_bavail as u64 * st.f_bsize as u64,
    })
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn too_big(data_bytes: u64, layout: &Layout) -> anyhow::Error {
    anyhow::anyhow!(
        "the rootfs ({} of file data) does not fit the {} root partition of disk.size {}: raise [disk] size in the recipe",
        crate::util::human_bytes(data_bytes),
        crate::util::human_bytes(layout.root_size),
        crate::util::human_bytes(layout.size)
    )
}

/// The virtual size qemu-img reports for an image.
pub fn virtual_size(image: &Path) -> Result<u64> {
    let out = Command::new(crate::util::hosttools::path_of(
        crate::util::hosttools::QEMU_IMG,
    )?)
    .args(["info", "--output=json"])
    .arg(image)
    .output()
    .context("cannot run qemu-img info")?;
    if !out.status.success() {
        bail!(
            "qemu-img info {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual-size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_scratch_needs_a_tmpfs() {
        let d = tempfile::tempdir().unwrap(); // on disk, not a tmpfs
        if statfs(d.path()).unwrap().fs_type != TMPFS_MAGIC {
            assert!(ram_dir(d.path(), 1, Some(u64::MAX / 4)).is_none());
        }
    }

    #[test]
    fn ram_scratch_is_refused_without_memory_to_spare() {
        let shm = Path::new(RAM_DIR);
        if statfs(shm).is_some_and(|s| s.fs_type == TMPFS_MAGIC) {
            assert!(ram_dir(shm, 1 << 20, Some(1 << 30)).is_none());
            assert!(ram_dir(shm, 1 << 20, None).is_none());
            let d = ram_dir(shm, 1 << 20, Some(8 << 30)).expect("room for 1 MiB");
            assert!(d.path().starts_with(shm));
        }
    }

    /// Stderr of mkfs.ext4 1.47.2 filling a 64 MiB sparse image from a 25 MB
    /// tar on an 8 MiB tmpfs (the host is full), and into an 8 MiB image on a
    /// roomy disk (the image is full).
    const HOST_FULL: &str =
        "__populate_fs_from_tar: No space left on device while looking up \"big\"\n\
        mkfs.ext4: No space left on device while populating file system";
    const IMAGE_FULL: &str =
        "handle_entry: Could not allocate block in ext2 filesystem while writing file \"f41\"\n\
        mkfs.ext4: Operation not permitted while populating file system";

    fn layout_4g() -> Layout {
        Layout::new(4 << 30, 256 * MIB, false).unwrap()
    }

    #[test]
    fn a_full_host_tmpfs_is_not_blamed_on_the_disk_size() {
        let host = FsStat {
            fs_type: TMPFS_MAGIC,
            free: 0,
        };
        let raw = Path::new("/dev/shm/kiln-1-x/disk.raw");
        let msg =
            mkfs_error(HOST_FULL, raw, Some(host), 900 * MIB, &layout_4g(), 2 << 30).to_string();
        assert!(!msg.contains("raise [disk] size"), "{msg}");
        // Names the filesystem, what it needs and how to avoid it.
        assert!(msg.contains("/dev/shm/kiln-1-x"), "{msg}");
        assert!(msg.contains("tmpfs"), "{msg}");
        // About 257 MiB + 2 GiB + 256 MiB, of which 900 MiB is written.
        assert!(
            msg.contains("2.5 GiB") && msg.contains("1.6 GiB more"),
            "{msg}"
        );
        assert!(msg.contains("KILN_RAM_SCRATCH=0"), "{msg}");
    }

    #[test]
    fn a_full_cache_filesystem_is_named_as_such() {
        let host = FsStat {
            fs_type: 0xEF53,
            free: 12 * 1024,
        };
        let raw = Path::new("/var/cache/kiln/tmp/build-1/disk.raw");
        let msg =
            mkfs_error(HOST_FULL, raw, Some(host), 900 * MIB, &layout_4g(), 2 << 30).to_string();
        assert!(!msg.contains("raise [disk] size"), "{msg}");
        assert!(msg.contains("/var/cache/kiln/tmp/build-1"), "{msg}");
        assert!(msg.contains("12.0 KiB free"), "{msg}");
        assert!(!msg.contains("KILN_RAM_SCRATCH"), "{msg}");
    }

    #[test]
    fn a_full_image_with_room_on_the_host_asks_for_a_larger_disk() {
        // The host filesystem as it really is (a test tmp dir has room).
        let d = tempfile::tempdir().unwrap();
        let host = statfs(d.path()).unwrap();
        assert!(
            host.free > HOST_FULL_SLACK,
            "the test needs some free space"
        );
        let raw = d.path().join("disk.raw");
        for err in [IMAGE_FULL, HOST_FULL] {
            let msg =
                mkfs_error(err, &raw, Some(host.clone()), 0, &layout_4g(), 2 << 30).to_string();
            assert!(msg.contains("raise [disk] size"), "{msg}");
        }
    }

    #[test]
    fn other_mkfs_failures_are_not_about_space_even_on_a_full_host() {
        let host = FsStat {
            fs_type: TMPFS_MAGIC,
            free: 0,
        };
        let msg = mkfs_error(
            "mkfs.ext4: Invalid argument while setting up superblock",
            Path::new("/dev/shm/kiln-1-x/disk.raw"),
            Some(host),
            0,
            &layout_4g(),
            1 << 30,
        )
        .to_string();
        assert!(msg.starts_with("mkfs.ext4 failed: "), "{msg}");
    }

    #[test]
    fn identities_are_stable_per_seed_and_differ_between_seeds() {
        assert_eq!(Identities::derive("a"), Identities::derive("a"));
        assert_ne!(
            Identities::derive("a").root_fs_uuid,
            Identities::derive("b").root_fs_uuid
        );
        let u = Identities::derive("a").root_fs_uuid;
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }

    #[test]
    fn layout_leaves_room_for_the_backup_gpt() {
        let l = Layout::new(2 << 30, 64 << 20, false).unwrap();
        assert_eq!(l.esp_start, 1 << 20);
        assert_eq!(l.bios_boot, None);
        assert_eq!(l.root_start, 65 << 20);
        assert_eq!(l.root_start + l.root_size + (1 << 20), 2 << 30);
        assert!(Layout::new(80 << 20, 64 << 20, false).is_err());
    }

    #[test]
    fn grub_cfg_finds_root_by_uuid_and_boots_the_kernel() {
        let ids = Identities::derive("x");
        let cfg = grub_cfg(&ids, "6.1.0-50-amd64", &cmdline(&ids, "quiet"));
        assert!(cfg.contains(&format!(
            "search --no-floppy --fs-uuid --set=root {}",
            ids.root_fs_uuid
        )));
        assert!(cfg.contains("linux /boot/vmlinuz-6.1.0-50-amd64 root=UUID="));
        assert!(cfg.contains("console=ttyS0,115200n8 quiet"));
    }

    #[test]
    fn bios_layout_puts_the_bios_boot_partition_between_esp_and_root() {
        let l = Layout::new(2 << 30, 64 << 20, true).unwrap();
        assert_eq!(l.esp_start, 1 << 20);
        assert_eq!(l.bios_boot, Some((65 << 20, 1 << 20)));
        assert_eq!(l.root_start, 66 << 20);
        assert_eq!(l.root_start + l.root_size + (1 << 20), 2 << 30);
    }

    #[test]
    fn uefi_only_gpt_script_is_unchanged() {
        let ids = Identities::derive("s");
        let l = Layout::new(2 << 30, 64 << 20, false).unwrap();
        assert_eq!(
            gpt_script(&l, &ids),
            format!(
                "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\
                 start=2048, size=131072, type={ESP_TYPE}, uuid={}, name=\"esp\"\n\
                 start=133120, size=4059136, type={ROOT_TYPE}, uuid={}, name=\"root\"\n",
                ids.disk_guid, ids.esp_guid, ids.root_guid
            )
        );
    }

    #[test]
    fn bios_gpt_script_keeps_esp_first_and_root_last() {
        let ids = Identities::derive("s");
        let l = Layout::new(2 << 30, 64 << 20, true).unwrap();
        let script = gpt_script(&l, &ids);
        let parts: Vec<&str> = script.lines().filter(|l| l.starts_with("start=")).collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[0].contains(ESP_TYPE));
        assert!(parts[1].contains(&format!(
            "start=133120, size=2048, type={BIOS_BOOT_TYPE}, uuid={}",
            ids.bios_guid
        )));
        assert!(parts[2].contains("start=135168, size=4057088") && parts[2].contains(ROOT_TYPE));
    }
}
