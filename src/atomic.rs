//! Writing files and folders so that a process killed at any instant (SIGKILL, power cut)
//! leaves either the old version or the new one, complete, never a mix: build beside the
//! target, fsync, rename into place, fsync the parent folder.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically (a temporary file beside it, fsynced, then renamed).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp");
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    sync_file(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(parent(path))
}

/// A hidden name beside `path` for staging it: `.NAME.WHAT-PID`.
pub fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    parent(path).join(format!(".{name}.{what}-{}", std::process::id()))
}

pub fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Makes a folder's entries (new names, renames) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(dir, e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Fsyncs every file of `dir` (recursively), then the folders themselves.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

/// Puts the finished folder `staged` at `target`, replacing what was there. On Linux the two
/// are swapped in one step (`renameat2(RENAME_EXCHANGE)`), so `target` always names a
/// complete folder; elsewhere the old one is moved aside first.
pub fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    sync_tree(staged)?;
    if target.exists() && exchange(staged, target) {
        // `staged` now holds the old folder.
        fs::remove_dir_all(staged).map_err(|e| Error::io(staged, e))?;
        return sync_dir(parent(target));
    }
    let old = sibling(target, "old");
    if target.exists() {
        let _ = fs::remove_dir_all(&old);
        fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    }
    fs::rename(staged, target).map_err(|e| Error::io(target, e))?;
    sync_dir(parent(target))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Swaps two paths atomically; false where the system cannot (then nothing changed).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        CString::new(a.as_os_str().as_bytes()),
        CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as relative paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_in_the_new_folder_and_removes_the_old_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let target = dir.path().join("final");
        for version in ["one", "two"] {
            let staged = sibling(&target, "tmp");
            fs::create_dir_all(&staged).unwrap();
            fs::write(staged.join("v"), version).unwrap();
            replace_dir(&staged, &target).unwrap();
            assert_eq!(fs::read_to_string(target.join("v")).unwrap(), version);
            assert!(!staged.exists());
        }
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only `final` is left");
    }

    #[test]
    fn write_file_replaces_the_content_whole() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("state.json");
        write_file(&path, b"{\"a\": 1}").unwrap();
        write_file(&path, b"{}").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
