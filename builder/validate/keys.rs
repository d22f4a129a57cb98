//! Throwaway SSH keys: one ed25519 key pair generated in-process for each
//! validation boot, handed to the guest through the NoCloud seed.

use anyhow::{Context, Result};
use ssh_key::{rand_core::OsRng, Algorithm, LineEnding, PrivateKey};
use zeroize::Zeroizing;

/// A key pair that lives only as long as one validation run.
pub struct ThrowawayKey {
    /// OpenSSH private key (`-----BEGIN OPENSSH …-----`), unencrypted.
    private_openssh: Zeroizing<String>,
    /// `ssh-ed25519 AAAA… comment`, as authorized_keys and meta-data want it.
    public_openssh: String,
}

impl ThrowawayKey {
    /// Generate a fresh ed25519 key from the OS random source.
    pub fn generate(comment: &str) -> Result<Self> {
        let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
            .context("cannot generate an ed25519 SSH key")?;
        key.set_comment(comment);
        let private_openssh = key
            .to_openssh(LineEnding::LF)
            .context("cannot encode the SSH private key")?;
        let public_openssh = key
            .public_key()
            .to_openssh()
            .context("cannot encode the SSH public key")?;
        Ok(Self {
            private_openssh,
            public_openssh,
        })
    }

    /// A key kept in a file (OpenSSH private key format), e.g. an
    /// environment's access key that outlives one run.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the SSH key {}", path.display()))?,
        );
        let key = PrivateKey::from_openssh(text.as_str()).with_context(|| {
            format!(
                "{} is not an unencrypted OpenSSH private key",
                path.display()
            )
        })?;
        let public_openssh = key
            .public_key()
            .to_openssh()
            .context("cannot encode the SSH public key")?;
        Ok(Self {
            private_openssh: Zeroizing::new(text.to_string()),
            public_openssh,
        })
    }

    pub fn private_openssh(&self) -> &str {
        &self.private_openssh
    }

    pub fn public_openssh(&self) -> &str {
        &self.public_openssh
    }

    /// Authenticate an SSH session as `user` with this key (libssh2, from memory).
    pub fn authenticate(&self, session: &ssh2::Session, user: &str) -> Result<()> {
        session
            .userauth_pubkey_memory(
                user,
                Some(&self.public_openssh),
                &self.private_openssh,
                None,
            )
            .with_context(|| format!("SSH key authentication as `{user}` failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_openssh_ed25519() {
        let k = ThrowawayKey::generate("kiln-validate").unwrap();
        assert!(k
            .private_openssh()
            .starts_with("-----BEGIN OPENSSH PRIVATE\x20KEY-----\n"));
        assert!(k.public_openssh().starts_with("ssh-ed25519 AAAA"));
        assert!(k.public_openssh().ends_with(" kiln-validate"));
        // The private half decodes again and carries the same public key.
        let back = PrivateKey::from_openssh(k.private_openssh()).unwrap();
        assert_eq!(back.public_key().to_openssh().unwrap(), k.public_openssh());
    }

    #[test]
    fn every_run_gets_a_different_key() {
        let a = ThrowawayKey::generate("a").unwrap();
        let b = ThrowawayKey::generate("a").unwrap();
        assert_ne!(a.public_openssh(), b.public_openssh());
    }
}
