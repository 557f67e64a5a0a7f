//! Atomic file writes: write a sibling temporary file, fsync, rename over the target. A reader
//! (or a rerun after SIGKILL) sees either the old file or the complete new one, never a torn one.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name beside `path`, unique per process and per call, so two writers (threads
/// or processes) of the same file never share a temporary.
fn temp_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{k}", std::process::id()))
}

/// Writes `path` atomically through `write`, which creates the file it is given (a
/// temporary beside `path`): then the temporary is fsynced, renamed over `path`, and the
/// folder fsynced, so after a crash `path` is the old file or the whole new one. On any error
/// the temporary is removed and `path` is untouched. The one helper for every atomic write.
pub fn write_with<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<()>
where
    E: std::fmt::Display,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = temp_beside(path);
    let result = write(&tmp)
        .map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))
        .and_then(|()| {
            let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // The rename is durable once the folder's entry is (best effort: not every filesystem
    // lets a folder be opened for fsync).
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// [`write_with`] for bytes in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| std::fs::write(tmp, bytes))
}

pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    write_atomic(path, &bytes)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("poodle-atomic-{}", std::process::id()));
        let p = dir.join("a.json");
        write_json_atomic(&p, &serde_json::json!({"x": 1})).unwrap();
        write_json_atomic(&p, &serde_json::json!({"x": 2})).unwrap();
        let v: serde_json::Value = read_json(&p).unwrap();
        assert_eq!(v["x"], 2);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
        // A writer that fails leaves the old file and no temporary.
        let e = write_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err::<(), std::io::Error>(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        let v: serde_json::Value = read_json(&p).unwrap();
        assert_eq!(v["x"], 2);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
