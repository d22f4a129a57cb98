//! BIOS boot for hybrid disks: GRUB's i386-pc `core.img`, made from the image's
//! own grub-pc-bin modules, embedded in a BIOS boot partition behind `boot.img`.
//!
//! This is what `grub-install --target=i386-pc` does, without touching a device:
//! `grub-mkimage` (host, package grub-common) turns the modules captured from the
//! rootfs tar into `core.img`, and kiln itself does `grub-bios-setup`'s part on
//! the plain disk file (as `grub-bios-setup --no-rs-codes` would): `boot.img`'s
//! code goes into the protective MBR, keeping the partition table, with the LBA
//! of `core.img`; `core.img` goes into the BIOS boot partition with its first
//! blocklist pointing at the rest of itself. Everything is a pure function of
//! the inputs, so the bytes are as reproducible as the rest of the disk.
//!
//! The embedded prefix is `(,gpt1)/EFI/BOOT`: GRUB fills in the boot drive and
//! reads the very `grub.cfg` the UEFI path uses from the ESP (partition 1), so
//! both firmwares boot the same kernel with the same command line.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// Where grub-pc-bin keeps the i386-pc image parts and modules in the rootfs.
pub const GRUB_PC_DIR: &str = "usr/lib/grub/i386-pc/";
/// GRUB's prefix in core.img: partition 1 (the ESP) of the disk BIOS booted from.
pub const PREFIX: &str = "(,gpt1)/EFI/BOOT";
/// Modules core.img carries: disk and partition access, the filesystems of the
/// ESP and the root, and what the shared grub.cfg runs (`search`, `linux`,
/// `initrd`, `boot`) in normal mode. grub-mkimage adds their dependencies.
pub const MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "fat",
    "ext2",
    "search",
    "search_fs_uuid",
    "linux",
    "boot",
    "configfile",
    "normal",
];

/// GRUB's `boot.img` layout (include/grub/i386/pc/boot.h).
const BPB_START: usize = 0x3;
const BPB_END: usize = 0x5a;
const KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const DRIVE_CHECK: usize = 0x66;
const WINDOWS_NT_MAGIC: usize = 0x1b8;
const PART_END: usize = 0x1fe;
/// `diskboot.img` loads sectors after the first to this segment (0x800 + 512/16).
const CORE_SEGMENT: u16 = 0x800 + (512 >> 4);
/// Size of one `grub_boot_blocklist` {start: u64, len: u16, segment: u16}.
const BLOCKLIST: usize = 12;
/// diskboot loads core.img below 0x78000 from link address 0x9000: its limit in sectors.
pub const MAX_CORE_SECTORS: u64 = (0x78000 - 0x9000) >> 9;

/// Files under [`GRUB_PC_DIR`] that making core.img and installing it read.
pub fn wanted(path: &str) -> bool {
    match path.strip_prefix(GRUB_PC_DIR) {
        Some(name) => {
            !name.contains('/')
                && (name.ends_with(".mod")
                    || name.ends_with(".lst")
                    || matches!(
                        name,
                        "kernel.img" | "diskboot.img" | "lzma_decompress.img" | "boot.img"
                    ))
        }
        None => false,
    }
}

/// `boot.img` and a freshly made `core.img`.
#[derive(Clone)]
pub struct BiosBoot {
    pub boot_img: Vec<u8>,
    pub core_img: Vec<u8>,
}

/// Make core.img with the host's grub-mkimage from the rootfs's i386-pc files
/// (`captured`, keyed by rootfs path), working in `scratch`.
pub fn make(captured: &HashMap<String, Vec<u8>>, scratch: &Path) -> Result<BiosBoot> {
    let need = |name: &str| {
        captured
            .get(&format!("{GRUB_PC_DIR}{name}"))
            .cloned()
            .with_context(|| {
                format!("the rootfs has no /{GRUB_PC_DIR}{name} (package grub-pc-bin); it is needed to boot with BIOS")
            })
    };
    let boot_img = need("boot.img")?;
    if boot_img.len() != 512 {
        bail!(
            "/{GRUB_PC_DIR}boot.img is {} bytes, not one 512-byte sector",
            boot_img.len()
        );
    }
    for name in [
        "kernel.img",
        "diskboot.img",
        "lzma_decompress.img",
        "moddep.lst",
    ] {
        need(name)?;
    }
    let dir = tempfile::Builder::new()
        .prefix("grub-i386-pc-")
        .tempdir_in(scratch)
        .context("cannot create a directory for grub-mkimage")?;
    let mut names: Vec<&String> = captured.keys().filter(|p| wanted(p)).collect();
    names.sort();
    for p in names {
        let name = &p[GRUB_PC_DIR.len()..];
        std::fs::write(dir.path().join(name), &captured[p])
            .with_context(|| format!("cannot write {name} for grub-mkimage"))?;
    }
    let core = dir.path().join("core.img");
    let out = Command::new(crate::util::hosttools::path_of(
        crate::util::hosttools::GRUB_MKIMAGE,
    )?)
    .args([
        "--format",
        "i386-pc",
        "--compression",
        "auto",
        "--prefix",
        PREFIX,
    ])
    .arg("--directory")
    .arg(dir.path())
    .arg("--output")
    .arg(&core)
    .args(MODULES)
    .stdin(Stdio::null())
    .output()
    .context("cannot run grub-mkimage")?;
    if !out.status.success() {
        bail!(
            "grub-mkimage failed making the BIOS core.img: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let core_img =
        std::fs::read(&core).with_context(|| format!("cannot read {}", core.display()))?;
    Ok(BiosBoot { boot_img, core_img })
}

/// The protective MBR with GRUB's boot code: `boot.img` with the existing
/// sector's BPB area and partition table (bytes 0x1b8..0x1fe) kept, the boot
/// drive taken from the BIOS, the floppy check disabled, and the LBA where
/// core.img starts.
pub fn patch_boot_img(
    boot_img: &[u8],
    existing_mbr: &[u8; 512],
    core_lba: u64,
) -> Result<[u8; 512]> {
    if boot_img.len() != 512 {
        bail!("boot.img is {} bytes, not 512", boot_img.len());
    }
    let mut s = [0u8; 512];
    s.copy_from_slice(boot_img);
    s[BPB_START..BPB_END].copy_from_slice(&existing_mbr[BPB_START..BPB_END]);
    s[DRIVE_CHECK] = 0x90;
    s[DRIVE_CHECK + 1] = 0x90;
    s[WINDOWS_NT_MAGIC..PART_END].copy_from_slice(&existing_mbr[WINDOWS_NT_MAGIC..PART_END]);
    s[BOOT_DRIVE] = 0xff;
    s[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    if s[510..512] != [0x55, 0xaa] {
        bail!("boot.img has no 0x55AA boot signature");
    }
    Ok(s)
}

/// core.img as it sits at `core_lba`, padded to whole sectors: diskboot's
/// blocklists (growing down from the end of the first sector) cleared and
/// replaced by one entry loading every following sector, then a terminator.
pub fn patch_core_img(core_img: &[u8], core_lba: u64) -> Result<Vec<u8>> {
    if core_img.len() < 1024 {
        bail!("core.img is only {} bytes", core_img.len());
    }
    let sectors = core_img.len().div_ceil(512);
    if sectors as u64 > MAX_CORE_SECTORS {
        bail!("core.img has {sectors} sectors, more than the {MAX_CORE_SECTORS} diskboot can load");
    }
    let mut c = core_img.to_vec();
    c.resize(sectors * 512, 0);
    // Clear the old lists, as grub-bios-setup does, down to their terminator.
    let mut at = 512 - BLOCKLIST;
    loop {
        let len = u16::from_le_bytes([c[at + 8], c[at + 9]]);
        if len == 0 {
            break;
        }
        c[at..at + BLOCKLIST].fill(0);
        if at < BLOCKLIST + 0x20 {
            bail!("core.img's first sector has no blocklist terminator");
        }
        at -= BLOCKLIST;
    }
    let first = 512 - BLOCKLIST;
    c[first..first + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    c[first + 8..first + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    c[first + 10..first + 12].copy_from_slice(&CORE_SEGMENT.to_le_bytes());
    let term = first - BLOCKLIST;
    c[term..first].fill(0);
    Ok(c)
}

/// Install boot.img in sector 0 and core.img at `part_start` (bytes) of the
/// BIOS boot partition of `part_size` bytes, on a disk whose GPT (and its
/// protective MBR) is already written.
pub fn install(
    disk: &mut std::fs::File,
    bios: &BiosBoot,
    part_start: u64,
    part_size: u64,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let core_lba = part_start / 512;
    let core = patch_core_img(&bios.core_img, core_lba)?;
    if core.len() as u64 > part_size {
        bail!(
            "the BIOS core.img ({}) does not fit its {} BIOS boot partition",
            crate::util::human_bytes(core.len() as u64),
            crate::util::human_bytes(part_size)
        );
    }
    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)
        .context("cannot read the protective MBR")?;
    if mbr[0x1c2] != 0xee {
        bail!("sector 0 is not a GPT protective MBR; cannot install BIOS boot code");
    }
    let sector0 = patch_boot_img(&bios.boot_img, &mbr, core_lba)?;
    disk.seek(SeekFrom::Start(part_start))?;
    disk.write_all(&core)
        .context("cannot write core.img into the BIOS boot partition")?;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&sector0)
        .context("cannot write boot.img into the protective MBR")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_boot_img() -> Vec<u8> {
        let mut b = vec![0xccu8; 512];
        b[DRIVE_CHECK] = 0xeb; // jmp over the drive check
        b[DRIVE_CHECK + 1] = 0x05;
        b[BOOT_DRIVE] = 0x00;
        b[510] = 0x55;
        b[511] = 0xaa;
        b
    }

    fn protective_mbr() -> [u8; 512] {
        let mut m = [0u8; 512];
        m[0x1be..0x1ce].copy_from_slice(&[
            0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0xff, 0x3f, 0,
        ]);
        m[0x1b8..0x1bc].copy_from_slice(&[1, 2, 3, 4]);
        m[510] = 0x55;
        m[511] = 0xaa;
        m
    }

    /// A core.img whose first sector ends in diskboot's default blocklist
    /// (start 2, len 0x7f... as shipped) and whose body is recognisable.
    fn fake_core_img(len: usize) -> Vec<u8> {
        let mut c: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let first = 512 - BLOCKLIST;
        c[first..first + 8].copy_from_slice(&2u64.to_le_bytes());
        c[first + 8..first + 10].copy_from_slice(&3u16.to_le_bytes());
        c[first + 10..first + 12].copy_from_slice(&0x820u16.to_le_bytes());
        c[first - BLOCKLIST..first].fill(0);
        c
    }

    #[test]
    fn boot_img_gets_core_lba_and_keeps_the_partition_table() {
        let mbr = protective_mbr();
        let s = patch_boot_img(&fake_boot_img(), &mbr, 133_120).unwrap();
        assert_eq!(
            &s[KERNEL_SECTOR..KERNEL_SECTOR + 8],
            &133_120u64.to_le_bytes()
        );
        assert_eq!(s[BOOT_DRIVE], 0xff, "boot drive comes from the BIOS");
        assert_eq!(&s[DRIVE_CHECK..DRIVE_CHECK + 2], &[0x90, 0x90]);
        assert_eq!(&s[0x1b8..0x200], &mbr[0x1b8..0x200], "partition table kept");
        assert_eq!(&s[BPB_START..BPB_END], &mbr[BPB_START..BPB_END]);
        assert_eq!(s[0], 0xcc, "boot code comes from boot.img");
        assert_eq!(&s[0x100..0x1b8], &fake_boot_img()[0x100..0x1b8]);
    }

    #[test]
    fn boot_img_of_the_wrong_size_is_refused() {
        assert!(patch_boot_img(&[0u8; 511], &protective_mbr(), 1).is_err());
    }

    #[test]
    fn core_img_first_blocklist_loads_the_rest_of_itself() {
        let core = fake_core_img(40 * 512 + 100);
        let c = patch_core_img(&core, 133_120).unwrap();
        assert_eq!(c.len(), 41 * 512, "padded to whole sectors");
        let first = 512 - BLOCKLIST;
        assert_eq!(&c[first..first + 8], &133_121u64.to_le_bytes());
        assert_eq!(&c[first + 8..first + 10], &40u16.to_le_bytes());
        assert_eq!(&c[first + 10..first + 12], &0x820u16.to_le_bytes());
        assert!(
            c[first - BLOCKLIST..first].iter().all(|b| *b == 0),
            "terminator"
        );
        assert_eq!(&c[..first - BLOCKLIST], &core[..first - BLOCKLIST]);
        assert_eq!(&c[512..core.len()], &core[512..], "body unchanged");
        assert!(c[core.len()..].iter().all(|b| *b == 0));
    }

    #[test]
    fn core_img_patching_is_deterministic() {
        let core = fake_core_img(9000);
        assert_eq!(
            patch_core_img(&core, 4096).unwrap(),
            patch_core_img(&core, 4096).unwrap()
        );
    }

    #[test]
    fn core_img_too_large_for_diskboot_is_refused() {
        let core = fake_core_img((MAX_CORE_SECTORS as usize + 1) * 512);
        let err = patch_core_img(&core, 2048).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn install_writes_mbr_and_core_and_nothing_else() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all(&protective_mbr()).unwrap();
        let bios = BiosBoot {
            boot_img: fake_boot_img(),
            core_img: fake_core_img(3000),
        };
        install(&mut f, &bios, 2 << 20, 1 << 20).unwrap();
        let mut all = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(
            &all[KERNEL_SECTOR..KERNEL_SECTOR + 8],
            &4096u64.to_le_bytes()
        );
        let core = patch_core_img(&bios.core_img, 4096).unwrap();
        assert_eq!(&all[2 << 20..(2 << 20) + core.len()], &core[..]);
        assert!(all[512..2 << 20].iter().all(|b| *b == 0));
        assert!(all[(2 << 20) + core.len()..].iter().all(|b| *b == 0));
    }

    #[test]
    fn install_refuses_a_core_img_larger_than_the_partition() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        std::io::Write::write_all(&mut f, &protective_mbr()).unwrap();
        let bios = BiosBoot {
            boot_img: fake_boot_img(),
            core_img: fake_core_img(300 * 512),
        };
        let err = install(&mut f, &bios, 1 << 20, 64 << 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn install_refuses_a_disk_without_a_protective_mbr() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        let bios = BiosBoot {
            boot_img: fake_boot_img(),
            core_img: fake_core_img(3000),
        };
        assert!(install(&mut f, &bios, 1 << 20, 1 << 20).is_err());
    }

    #[test]
    fn rootfs_without_grub_pc_bin_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let err = make(&HashMap::new(), dir.path())
            .err()
            .expect("no boot.img")
            .to_string();
        assert!(
            err.contains("boot.img") && err.contains("grub-pc-bin"),
            "{err}"
        );
    }

    #[test]
    fn only_i386_pc_image_parts_and_modules_are_wanted() {
        assert!(wanted("usr/lib/grub/i386-pc/boot.img"));
        assert!(wanted("usr/lib/grub/i386-pc/ext2.mod"));
        assert!(wanted("usr/lib/grub/i386-pc/moddep.lst"));
        assert!(!wanted("usr/lib/grub/i386-pc/cdboot.img"));
        assert!(!wanted("usr/lib/grub/x86_64-efi/ext2.mod"));
        assert!(!wanted("usr/lib/grub/i386-pc/sub/x.mod"));
    }
}
