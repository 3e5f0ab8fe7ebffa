//! WireGuard keys and the cluster secret: generation, the 0600 key file, base64 text compatible
//! with `wg genkey` / `wg pubkey`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};

/// Why a key could not be read, parsed or stored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not base64 of 32 bytes.
    #[error("{what} is not a base64 WireGuard key (32 bytes): {detail}")]
    Invalid {
        /// What was being read (`key file /var/lib/weft/private.key`, `standard input`).
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// 32 random bytes from the OS.
fn random32() -> [u8; 32] {
    use rand_core::RngCore;
    let mut b = [0; 32];
    rand_core::OsRng.fill_bytes(&mut b);
    b
}

/// A new private key, clamped as `wg genkey` prints it.
pub fn generate() -> StaticSecret {
    StaticSecret::from(clamp(random32()))
}

/// A new cluster secret: 32 random bytes.
pub fn generate_secret() -> [u8; 32] {
    random32()
}

/// Curve25519 clamping, as `wg genkey` applies it before printing.
fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

/// Base64 of 32 bytes.
pub fn encode(bytes: &[u8; 32]) -> String {
    STANDARD.encode(bytes)
}

/// Parses base64 text (surrounding whitespace allowed) into 32 bytes.
pub fn decode(text: &str, what: &str) -> Result<[u8; 32], KeyError> {
    let invalid = |detail: String| KeyError::Invalid {
        what: what.to_owned(),
        detail,
    };
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| invalid(e.to_string()))?;
    let n = bytes.len();
    bytes
        .try_into()
        .map_err(|_| invalid(format!("decodes to {n} bytes")))
}

/// The public key of a private key, base64.
pub fn public_of(private: &StaticSecret) -> String {
    encode(PublicKey::from(private).as_bytes())
}

/// Reads the private key at `path`, or creates it (0600, parent directories 0700) when the file
/// does not exist. Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(StaticSecret, bool), KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match fs::read_to_string(path) {
        Ok(text) => {
            let what = format!("key file {}", path.display());
            let key = decode(&text, &what)?;
            let mode = fs::metadata(path).map_err(io_err)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "private key file is readable by others");
            }
            Ok((StaticSecret::from(key), false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = generate();
            create(path, &key.to_bytes())?;
            Ok((key, true))
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes the private key `key` to a new file at `path` (0600, parent directories 0700), as
/// `wg genkey` prints it. Written whole to a temporary name, then linked into place: a crash
/// never leaves a half-written key, and an existing key is never overwritten (an error).
pub fn create(path: &Path, key: &[u8; 32]) -> Result<(), KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", encode(key)).as_bytes())?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    };
    let result = write();
    let _ = fs::remove_file(&tmp);
    result.map_err(io_err)
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_clamped_and_round_trip() {
        let k = generate();
        let b = k.to_bytes();
        assert_eq!(b[0] & 7, 0);
        assert_eq!(b[31] & 0xc0, 0x40);
        assert_eq!(decode(&encode(&b), "test").unwrap(), b);
    }

    #[test]
    fn known_wg_vector() {
        // `echo <private> | wg pubkey`, computed with wireguard-tools.
        let private = decode("ECh2+mHoxy+9vLNwQSz8FA8o4bSCt4OAfvomJhfOU1U=", "t").unwrap();
        let public = public_of(&StaticSecret::from(private));
        assert_eq!(public, "hJ2cyT4v9RNYjVomq2GWmPL10mMxu7mrlN3NJyySpjE=");
    }

    #[test]
    fn bad_keys_name_the_problem() {
        let e = decode("not base64!", "standard input")
            .unwrap_err()
            .to_string();
        assert!(e.contains("standard input"), "{e}");
        let e = decode("AAAA", "standard input").unwrap_err().to_string();
        assert!(e.contains("decodes to 3 bytes"), "{e}");
    }

    #[test]
    fn key_file_is_created_0600_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/private.key");
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        fs::write(&path, "garbage").unwrap();
        let e = load_or_create(&path).err().unwrap().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
}
