//! Files the daemon keeps (IPAM state, CNI attachments, the CNI conflist), written so that a
//! crash never leaves half of one: a temporary file beside it, fsync, rename, fsync of the
//! directory.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Numbers the temporary files of this process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically, creating its directory; only `path` and a temporary
/// sibling of its own (`<path>.weft-tmp.<pid>.<n>`, created new, removed on failure) are
/// touched, so writers in several threads or processes never share one. The directory is
/// fsynced after the rename, so the new name survives a crash too.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let (tmp, mut f) = create_temporary(path, 0o666)?;
    let written = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// A new temporary file beside `path` that no other writer has, created with `mode` (less the
/// umask) from the start, so a secret is never readable by others even for a moment.
pub(crate) fn create_temporary(path: &Path, mode: u32) -> std::io::Result<(PathBuf, File)> {
    loop {
        let tmp = temporary_name(path, NEXT.fetch_add(1, Ordering::Relaxed));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // Left by an earlier process with the same pid (in a container the daemon is
            // always pid 1), or another writer's: not ours to remove; take the next number.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// The `n`th temporary name of this process beside `path`.
fn temporary_name(path: &Path, n: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".weft-tmp.{}.{n}", std::process::id()));
    PathBuf::from(name)
}

/// The temporary names beside `path` this process tries next (tests leave files there).
#[cfg(test)]
pub(crate) fn next_temporary_names(path: &Path, count: u64) -> Vec<PathBuf> {
    let n = NEXT.load(Ordering::Relaxed);
    (n..n + count).map(|n| temporary_name(path, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_atomic_writers_leave_one_whole_file_and_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // Texts of different lengths: a shared temporary would mix a long and a short one.
        let text = |t: usize, i: usize| {
            format!(
                "{{\"writer\":{t},\"i\":{i},\"pad\":\"{}\"}}",
                "x".repeat(t * 300 + i)
            )
        };
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..50 {
                        write_atomic(path, text(t, i).as_bytes())
                            .unwrap_or_else(|e| panic!("writer {t} write {i}: {e}"));
                    }
                });
            }
        });
        let last = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["i"], 49, "{last}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }
}
