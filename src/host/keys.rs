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
    /// A file holding a private key or the cluster secret that others than its owner may read.
    #[error(
        "{path} holds a secret but is readable by its group or others (mode {mode:o}): \
         refusing to use it; make it private with `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
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
    encode(&public_bytes(private))
}

/// The public key of a private key.
pub fn public_bytes(private: &StaticSecret) -> [u8; 32] {
    *PublicKey::from(private).as_bytes()
}

/// Reads the private key at `path`, or creates it (0600, parent directories 0700) when the file
/// does not exist. Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(StaticSecret, bool), KeyError> {
    match read_private(path) {
        Ok(text) => {
            let what = format!("key file {}", path.display());
            let key = decode(&text, &what)?;
            Ok((StaticSecret::from(key), false))
        }
        Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let key = generate();
            create(path, &key.to_bytes())?;
            Ok((key, true))
        }
        Err(e) => Err(e),
    }
}

/// Reads a file that holds a secret (a private key, the cluster secret), refusing it
/// ([`KeyError::Exposed`], naming the file) when its group or others may read or write it. The
/// mode is checked on the file opened, so a file swapped in between cannot slip past.
pub fn read_private(path: &Path) -> Result<String, KeyError> {
    use std::io::Read as _;
    let io_err = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io_err)?;
    let mode = f.metadata().map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.display().to_string(),
            mode,
        });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io_err)?;
    Ok(text)
}

/// Writes `contents` to `path` readable by its owner only (0600, also when the file existed),
/// as [`read_private`] wants it: for tools and tests that hand weft a secret file.
pub fn write_private(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> io::Result<()> {
    let path = path.as_ref();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_ref())?;
    f.sync_all()
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
    let (tmp, mut f) = super::files::create_temporary(path, 0o600).map_err(io_err)?;
    let mut write = || -> io::Result<()> {
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

    #[test]
    fn a_temporary_key_file_left_by_a_killed_process_with_our_pid_does_not_block_creation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        // In a container the daemon is always pid 1: a SIGKILL between creating the temporary
        // file and linking it leaves the names the next start tries first.
        let leftovers = super::super::files::next_temporary_names(&path, 4);
        for l in &leftovers {
            fs::write(l, "half a key").unwrap();
        }
        let (key, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(load_or_create(&path).unwrap().0.to_bytes(), key.to_bytes());
        // The leftovers are not ours to remove; our own temporary is gone.
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let mut want = leftovers;
        want.push(path.clone());
        want.sort();
        assert_eq!(names, want);
    }

    #[test]
    fn a_key_or_secret_file_readable_by_group_or_others_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let (key, _) = load_or_create(&path).unwrap();
        for mode in [0o640, 0o604, 0o620, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let e = load_or_create(&path).err().unwrap().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(
                e.contains(&format!("mode {mode:o}")) && e.contains("chmod 600"),
                "{e}"
            );
            assert!(matches!(read_private(&path), Err(KeyError::Exposed { .. })));
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_or_create(&path).unwrap().0.to_bytes(), key.to_bytes());
        // write_private makes an existing, exposed file private.
        let secret = dir.path().join("secret");
        fs::write(&secret, "old").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o666)).unwrap();
        write_private(&secret, encode(&generate_secret())).unwrap();
        assert_eq!(
            fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(read_private(&secret).is_ok());
    }
}
