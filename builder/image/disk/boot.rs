//! The boot files a disk is made from: shim, signed GRUB, the newest kernel
//! and (for hybrid disks) GRUB's BIOS images, all read from the base rootfs.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

use crate::image::compose::{BaseInfo, Node};
use crate::image::manifest::BootComponent;
use crate::image::recipe::Recipe;

/// Whether compose must capture `path` from the base rootfs for the disk
/// (and the kernel, for its digest in the boot chain).
pub(crate) fn wanted(path: &str, bios: bool) -> bool {
    path == super::SHIM
        || path == super::GRUB_SIGNED
        || path == super::MOK_MANAGER
        || path.starts_with(KERNEL_PREFIX)
        || (bios && super::bios::wanted(path))
}

/// Kernels in the rootfs: `boot/vmlinuz-<version>`.
const KERNEL_PREFIX: &str = "boot/vmlinuz-";

/// Shim, signed grub, the kernel version and (for BIOS boot) GRUB's i386-pc
/// images made from the base rootfs's grub-pc-bin, in `scratch`.
pub(crate) fn files(info: &BaseInfo, recipe: &Recipe, scratch: &Path) -> Result<super::BootFiles> {
    let need = |p: &str, pkg: &str| {
        info.captured.get(p).cloned().with_context(|| {
            format!("the rootfs has no /{p} (package {pkg}); it is needed to boot with Secure Boot")
        })
    };
    let mut kernels: Vec<&str> = info
        .index
        .nodes
        .iter()
        .filter(|(p, n)| **n == Node::File && p.starts_with(KERNEL_PREFIX))
        .map(|(p, _)| p.trim_start_matches(KERNEL_PREFIX))
        .collect();
    kernels.sort_by(|a, b| version_cmp(a, b));
    let kv = kernels
        .last()
        .with_context(|| {
            format!(
                "the rootfs has no kernel in /boot (package linux-image-{})",
                recipe.base.architecture
            )
        })?
        .to_string();
    if !info
        .index
        .nodes
        .contains_key(&format!("boot/initrd.img-{kv}"))
    {
        bail!("the rootfs has no /boot/initrd.img-{kv} (package initramfs-tools)");
    }
    Ok(super::BootFiles {
        shim: need(super::SHIM, "shim-signed")?,
        grub: need(super::GRUB_SIGNED, "grub-efi-amd64-signed")?,
        mok_manager: info.captured.get(super::MOK_MANAGER).cloned(),
        bios: if recipe.boot.bios {
            Some(super::bios::make(&info.captured, scratch)?)
        } else {
            None
        },
        kernel_version: kv,
    })
}

/// What boots, in order (shim, GRUB, the kernel, then MokManager when
/// shipped), each with the package whose dpkg file list names it and that
/// package's version. `info` must hold dpkg's file lists (see
/// `image::sbom::wanted`).
pub(crate) fn chain(
    info: &BaseInfo,
    boot: &super::BootFiles,
    dpkg: &BTreeMap<String, crate::image::rootfs::DpkgEntry>,
) -> Vec<BootComponent> {
    let kernel = format!("{KERNEL_PREFIX}{}", boot.kernel_version);
    let pieces = [
        ("shim", super::SHIM),
        ("grub", super::GRUB_SIGNED),
        ("kernel", kernel.as_str()),
        ("mok-manager", super::MOK_MANAGER),
    ];
    pieces
        .into_iter()
        .filter_map(|(component, file)| {
            let bytes = info.captured.get(file)?;
            let package = crate::image::rootfs::dpkg_owner(&info.captured, file);
            Some(BootComponent {
                component: component.to_string(),
                file: format!("/{file}"),
                sha256: crate::util::sha256_hex(bytes),
                version: package
                    .as_ref()
                    .and_then(|p| dpkg.get(p))
                    .map(|e| e.version.clone()),
                package,
            })
        })
        .collect()
}

/// Compare kernel versions by their numeric parts.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse::<u64>().ok())
            .collect::<Vec<_>>()
    };
    parts(a).cmp(&parts(b)).then(a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_chain_names_the_package_each_piece_came_from() {
        let kv = "6.1.0-50-amd64";
        let kernel = format!("{KERNEL_PREFIX}{kv}");
        let captured: std::collections::HashMap<String, Vec<u8>> = [
            (super::super::SHIM.to_string(), b"shim".to_vec()),
            (super::super::GRUB_SIGNED.to_string(), b"grub".to_vec()),
            (kernel.clone(), b"vmlinuz".to_vec()),
            (
                "var/lib/dpkg/info/shim-signed:amd64.list".into(),
                format!("/{}\n", super::super::SHIM).into_bytes(),
            ),
            (
                format!("var/lib/dpkg/info/linux-image-{kv}.list"),
                format!("/{kernel}\n").into_bytes(),
            ),
        ]
        .into();
        let info = BaseInfo {
            index: Default::default(),
            captured,
            data_bytes: 0,
        };
        let boot = super::super::BootFiles {
            shim: b"shim".to_vec(),
            grub: b"grub".to_vec(),
            mok_manager: None,
            bios: None,
            kernel_version: kv.into(),
        };
        let dpkg = crate::image::rootfs::parse_dpkg_entries(&format!(
            "Package: shim-signed\nStatus: install ok installed\nVersion: 1.44\n\nPackage: linux-image-{kv}\nStatus: install ok installed\nVersion: 6.1.176-1\n"
        ));
        let c = chain(&info, &boot, &dpkg);
        let got: Vec<(&str, Option<&str>, Option<&str>)> = c
            .iter()
            .map(|c| {
                (
                    c.component.as_str(),
                    c.package.as_deref(),
                    c.version.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("shim", Some("shim-signed"), Some("1.44")),
                ("grub", None, None),
                (
                    "kernel",
                    Some("linux-image-6.1.0-50-amd64"),
                    Some("6.1.176-1")
                ),
            ]
        );
        assert_eq!(c[2].sha256, crate::util::sha256_hex(b"vmlinuz"));
        assert_eq!(c[2].file, format!("/{kernel}"));
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = ["6.1.0-9-amd64", "6.1.0-50-amd64", "6.1.0-10-amd64"];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v.last(), Some(&"6.1.0-50-amd64"));
    }
}
