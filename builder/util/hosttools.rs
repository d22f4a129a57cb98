//! Host tools kiln shells out to, checked before work starts so a missing one
//! is named together with the Debian package that provides it.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// A program kiln runs, and where it comes from on Debian.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool {
    program: "mmdebstrap",
    package: "mmdebstrap",
};
pub const MKFS_EXT4: Tool = Tool {
    program: "mkfs.ext4",
    package: "e2fsprogs (>= 1.47.1, bookworm-backports)",
};
pub const SFDISK: Tool = Tool {
    program: "sfdisk",
    package: "fdisk",
};
pub const QEMU_IMG: Tool = Tool {
    program: "qemu-img",
    package: "qemu-utils",
};
pub const QEMU_SYSTEM: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
};

/// Network namespaces, bridges and tap devices for the local environment provider.
pub const IP: Tool = Tool {
    program: "ip",
    package: "iproute2",
};

/// Builds the NoCloud seed ISO environments' VMs boot with.
pub const GENISOIMAGE: Tool = Tool {
    program: "genisoimage",
    package: "genisoimage",
};

/// Makes GRUB's BIOS core.img for recipes with `[boot] bios = true`.
pub const GRUB_MKIMAGE: Tool = Tool {
    program: "grub-mkimage",
    package: "grub-common",
};
/// Signs and verifies images' SHA256SUMS (`kiln sign`, `kiln verify`).
pub const SSH_KEYGEN: Tool = Tool {
    program: "ssh-keygen",
    package: "openssh-client",
};

/// Tools `kiln build` needs.
pub const BUILD_TOOLS: &[Tool] = &[MMDEBSTRAP, MKFS_EXT4, SFDISK, QEMU_IMG];

/// Find a program on PATH (plus the sbin directories, which a non-root PATH may lack).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fail with one line naming every missing tool and its package.
pub fn require(tools: &[Tool]) -> Result<()> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| which(t.program).is_none())
        .map(|t| format!("{} (apt install {})", t.program, t.package))
        .collect();
    if !missing.is_empty() {
        bail!("missing host tools: {}", missing.join(", "));
    }
    Ok(())
}

/// Resolve a tool to its path, or fail naming the package.
pub fn path_of(tool: Tool) -> Result<PathBuf> {
    require(&[tool])?;
    Ok(which(tool.program).expect("checked by require"))
}

/// The first firmware file that exists, or an error naming the package.
pub fn firmware(candidates: &[&str], package: &str) -> Result<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("missing firmware {} (apt install {package})", candidates[0])
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_is_named_with_its_package() {
        let err = require(&[Tool {
            program: "kiln-no-such-tool",
            package: "kiln-pkg",
        }])
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kiln-no-such-tool"), "{msg}");
        assert!(msg.contains("apt install kiln-pkg"), "{msg}");
    }

    #[test]
    fn present_tool_passes() {
        require(&[Tool {
            program: "sh",
            package: "dash",
        }])
        .unwrap();
    }
}
