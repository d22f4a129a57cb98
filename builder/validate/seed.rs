//! NoCloud seed: a small VFAT volume labelled `CIDATA` holding `user-data`,
//! `meta-data` and optionally `network-config`, built in-process with `fatfs`
//! (no mkfs, no mounts).

use anyhow::{Context, Result};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

/// What the seed carries to cloud-init.
#[derive(Debug, Clone)]
pub(crate) struct Seed {
    pub instance_id: String,
    pub hostname: String,
    /// `ssh-ed25519 AAAA…` keys for cloud-init's default user.
    pub public_keys: Vec<String>,
    /// The role's user-data, untouched (or a minimal `#cloud-config`).
    pub user_data: String,
    /// A `network-config` file (network config version 2); without one
    /// cloud-init falls back to DHCP on the first NIC.
    pub network_config: Option<String>,
}

/// Network config version 2 for one NIC with a static address: the NIC is
/// found by its MAC and named `eth0` (the name kiln's images and role
/// templates use: `net.ifnames=0`), with a default route and DNS servers.
///
/// cloud-init's NoCloud reads `network-config` from the seed next to
/// `meta-data` (canonical/cloud-init doc/rtd/reference/datasources/nocloud.rst);
/// the format is doc/rtd/reference/network-config-format-v2.rst. `set-name`
/// is what makes cloud-init rename the matched NIC (cloudinit/net/__init__.py,
/// `_version_2`: "only rename if configured to do so"), and the networkd
/// renderer matches on the entry's name as well as its MAC, so the entry is
/// called `eth0` too.
pub(crate) fn static_network_config(
    mac: &str,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    dns: &[Ipv4Addr],
) -> String {
    let mut s = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: {}\n    set-name: eth0\n    addresses:\n      - {}\n    routes:\n      - to: 0.0.0.0/0\n        via: {}\n",
        yaml_str(&mac.to_ascii_lowercase()),
        yaml_str(&format!("{address}/{prefix}")),
        yaml_str(&gateway.to_string()),
    );
    if !dns.is_empty() {
        s.push_str("    nameservers:\n      addresses:\n");
        for d in dns {
            s.push_str(&format!("        - {}\n", yaml_str(&d.to_string())));
        }
    }
    s
}

/// User-data used when an image declares none.
pub(crate) const MINIMAL_USER_DATA: &str = "#cloud-config\n{}\n";

/// Size of the seed volume: small, but large enough for FAT12 and big
/// user-data documents.
const SEED_BYTES: u64 = 4 << 20;

impl Seed {
    /// NoCloud meta-data (YAML): the instance id, hostname and SSH keys. Keys
    /// go here, not into user-data, so the role's user-data stays as written.
    pub(crate) fn meta_data(&self) -> String {
        let mut s = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            yaml_str(&self.instance_id),
            yaml_str(&self.hostname)
        );
        if !self.public_keys.is_empty() {
            s.push_str("public-keys:\n");
            for k in &self.public_keys {
                s.push_str(&format!("  - {}\n", yaml_str(k)));
            }
        }
        s
    }

    /// Write the seed volume to `path` (atomically).
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".kiln-seed-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
        self.write_volume(tmp.as_file_mut())
            .with_context(|| format!("cannot build the NoCloud seed {}", path.display()))?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Write the seed as an ISO 9660 volume labelled `cidata` to `path`
    /// (atomically, mode 0600: user-data may hold secrets), for a CD-ROM
    /// drive: the form a Proxmox VM gets it in (an `iso` volume on `ide2`),
    /// and the local provider too, so both go the same way. Built with
    /// `genisoimage -volid cidata -joliet -rock` as cloud-init documents it
    /// (canonical/cloud-init doc/rtd/reference/datasources/nocloud.rst) and
    /// as Proxmox builds its own cloud-init drives
    /// (qemu-server PVE/QemuServer/Cloudinit.pm, `commit_cloudinit_disk`).
    pub(crate) fn write_iso(&self, path: &Path) -> Result<()> {
        let tool = crate::util::hosttools::path_of(crate::util::hosttools::GENISOIMAGE)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let files = tempfile::Builder::new()
            .prefix(".kiln-seed-")
            .tempdir_in(dir)
            .with_context(|| format!("cannot create a temp directory in {}", dir.display()))?;
        let meta_data = self.meta_data();
        let mut names = vec!["user-data", "meta-data"];
        crate::util::write_private(&files.path().join("user-data"), self.user_data.as_bytes())?;
        crate::util::write_private(&files.path().join("meta-data"), meta_data.as_bytes())?;
        if let Some(nc) = &self.network_config {
            crate::util::write_private(&files.path().join("network-config"), nc.as_bytes())?;
            names.push("network-config");
        }
        let iso = files.path().join("cidata.iso");
        let out = std::process::Command::new(&tool)
            .args(["-quiet", "-input-charset", "utf-8", "-volid", "cidata"])
            .args(["-joliet", "-rock", "-output"])
            .arg(&iso)
            .args(&names)
            .current_dir(files.path())
            .output()
            .with_context(|| format!("cannot run {}", tool.display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "genisoimage failed to build the NoCloud seed for {}: {}",
                self.hostname,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::set_permissions(&iso, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        std::fs::rename(&iso, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    fn write_volume(&self, file: &mut std::fs::File) -> Result<()> {
        file.set_len(SEED_BYTES)?;
        fatfs::format_volume(
            &mut *file,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*b"CIDATA     ")
                .fat_type(fatfs::FatType::Fat12),
        )?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))?;
        let fs = fatfs::FileSystem::new(&mut *file, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            let meta_data = self.meta_data();
            let mut files = vec![
                ("user-data", self.user_data.as_str()),
                ("meta-data", meta_data.as_str()),
            ];
            if let Some(nc) = &self.network_config {
                files.push(("network-config", nc.as_str()));
            }
            for (name, contents) in files {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(contents.as_bytes())?;
                f.flush()?;
            }
        }
        fs.unmount()?;
        Ok(())
    }
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn seed() -> Seed {
        Seed {
            instance_id: "kiln-validate-0123".into(),
            hostname: "kiln-validate-0123".into(),
            public_keys: vec!["ssh-ed25519 AAAAC3Nza kiln".into()],
            user_data: "#cloud-config\nwrite_files: []\n".into(),
            network_config: None,
        }
    }

    fn read_file(path: &Path, name: &str) -> Option<String> {
        let mut f = std::fs::File::open(path).unwrap();
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).unwrap();
        let mut text = String::new();
        fs.root_dir()
            .open_file(name)
            .ok()?
            .read_to_string(&mut text)
            .unwrap();
        Some(text)
    }

    #[test]
    fn a_static_network_config_matches_the_nic_by_mac_with_address_gateway_and_dns() {
        let nc = static_network_config(
            "52:54:00:AB:cd:01",
            "10.77.0.11".parse().unwrap(),
            24,
            "10.77.0.1".parse().unwrap(),
            &["10.77.0.1".parse().unwrap(), "10.77.0.2".parse().unwrap()],
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&nc).unwrap();
        let eth0 = &v["ethernets"]["eth0"];
        assert_eq!(v["version"], 2);
        assert_eq!(eth0["match"]["macaddress"], "52:54:00:ab:cd:01");
        assert_eq!(eth0["set-name"], "eth0");
        assert_eq!(eth0["addresses"][0], "10.77.0.11/24");
        assert_eq!(eth0["routes"][0]["to"], "0.0.0.0/0");
        assert_eq!(eth0["routes"][0]["via"], "10.77.0.1");
        assert_eq!(eth0["nameservers"]["addresses"][1], "10.77.0.2");
        let none = static_network_config(
            "52:54:00:00:00:01",
            "10.0.0.5".parse().unwrap(),
            16,
            "10.0.0.1".parse().unwrap(),
            &[],
        );
        assert!(!none.contains("nameservers"), "{none}");
    }

    #[test]
    fn network_config_is_in_the_seed_only_when_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        seed().write(&path).unwrap();
        assert_eq!(read_file(&path, "network-config"), None);
        let mut s = seed();
        s.network_config = Some("version: 2\nethernets: {}\n".into());
        s.write(&path).unwrap();
        assert_eq!(
            read_file(&path, "network-config").as_deref(),
            Some("version: 2\nethernets: {}\n")
        );
        assert!(read_file(&path, "meta-data")
            .unwrap()
            .starts_with("instance-id:"));
    }

    #[test]
    fn meta_data_carries_id_hostname_and_keys() {
        assert_eq!(
            seed().meta_data(),
            "instance-id: \"kiln-validate-0123\"\nlocal-hostname: \"kiln-validate-0123\"\npublic-keys:\n  - \"ssh-ed25519 AAAAC3Nza kiln\"\n"
        );
    }

    #[test]
    fn seed_volume_is_labelled_cidata_and_holds_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        seed().write(&path).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut ud = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut ud)
            .unwrap();
        assert_eq!(ud, "#cloud-config\nwrite_files: []\n");
        let mut md = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut md)
            .unwrap();
        assert!(md.contains("ssh-ed25519 AAAAC3Nza kiln"));
    }

    #[test]
    fn blkid_sees_the_cidata_label_as_cloud_init_does() {
        // cloud-init finds the seed with blkid; the label must be visible to it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        seed().write(&path).unwrap();
        let out = std::process::Command::new("blkid")
            .args(["-o", "export"])
            .arg(&path)
            .output()
            .expect("blkid (util-linux) is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("LABEL=CIDATA"), "{text}");
        assert!(text.contains("TYPE=vfat"), "{text}");
    }

    #[test]
    fn mtools_reads_the_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        seed().write(&path).unwrap();
        let out = std::process::Command::new("mtype")
            .arg("-i")
            .arg(&path)
            .arg("::meta-data")
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .expect("mtype (mtools) is installed");
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("instance-id:"));
    }

    #[test]
    fn the_iso_seed_is_an_iso9660_volume_labelled_cidata_readable_only_by_its_owner() {
        // cloud-init's NoCloud takes iso9660 as well as vfat volumes labelled
        // cidata (cloudinit/sources/DataSourceNoCloud.py, `_get_devices`).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        let mut s = seed();
        s.network_config = Some("version: 2\nethernets: {}\n".into());
        s.write_iso(&path).unwrap();
        let out = std::process::Command::new("blkid")
            .args(["-o", "export"])
            .arg(&path)
            .output()
            .expect("blkid (util-linux) is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("LABEL=cidata"), "{text}");
        assert!(text.contains("TYPE=iso9660"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }

    #[test]
    fn the_iso_seed_keeps_the_nocloud_file_names_through_rock_ridge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        let mut s = seed();
        s.network_config = Some("version: 2\nethernets: {}\n".into());
        s.write_iso(&path).unwrap();
        let read = |name: &str| {
            let out = std::process::Command::new("isoinfo")
                .args(["-R", "-x"])
                .arg(format!("/{name}"))
                .arg("-i")
                .arg(&path)
                .output()
                .expect("isoinfo (genisoimage) is installed");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert_eq!(read("user-data"), seed().user_data);
        assert_eq!(read("meta-data"), seed().meta_data());
        assert_eq!(read("network-config"), "version: 2\nethernets: {}\n");
    }
}
