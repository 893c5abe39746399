//! One process per folder: an exclusive advisory lock that the kernel holds for an open file
//! (`flock(2)`, through std's `File::try_lock`), so it ends with the process however the
//! process ends (SIGKILL included): a lock is never stale, and nothing has to guess from pids.
//! The file also says who holds it (pid, host, command, start time), for the refusal message.
//!
//! `train` holds `output.dir/.train.lock` for its whole life; `sweep run` holds
//! `trial-N/.sweep.lock` while it runs trial N and `DIR/.memory.lock` while it updates
//! memory.json. Readers (`plot`, `eval`, `encode`) take no lock.
//!
//! The file is never deleted: a process that opened it before the delete would hold a lock on
//! a file the next one no longer sees. It is emptied on release instead.
//!
//! Across hosts this is as good as the filesystem's locking: on Linux NFS clients `flock` is
//! carried out as a whole-file `fcntl` lock on the server (NFSv4, or NFSv3 with lockd), so two
//! hosts exclude each other; a mount with `nolock` (or `local_lock=all`/`flock`) keeps locks
//! on one host; and a lock of a host that crashed lasts until the server's lease runs out
//! (NFSv4: 90 s by default) rather than ending at once. See docs/reliability.md.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct Lock {
    file: File,
}

/// Who holds a lock, as its holder wrote it in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// What holds it: "train", "sweep run".
    pub command: String,
    pub started_unix: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = UNIX_EPOCH + Duration::from_secs(self.started_unix);
        write!(
            f,
            "`st-tune {}`, pid {} on host {}, started {}",
            self.command,
            self.pid,
            self.host,
            humantime::format_rfc3339_seconds(started)
        )
    }
}

/// Why a lock was not taken: another process holds it. `holder` is `None` when its file does
/// not say (the holder was just starting, or is not st-tune).
#[derive(Debug, Clone)]
pub struct Busy {
    pub path: PathBuf,
    pub holder: Option<Holder>,
}

impl Busy {
    /// "`st-tune train`, pid 4242 on host gpu-3, started 2026-12-07T03:10:00Z".
    pub fn who(&self) -> String {
        self.holder.as_ref().map_or_else(
            || "another process (its lock file does not say which)".to_string(),
            Holder::to_string,
        )
    }
}

impl Lock {
    /// Takes the lock of `path` (creating the file, not its folder) for `command`, or says who
    /// holds it. Never waits.
    pub fn try_take(path: &Path, command: &str) -> Result<Result<Lock, Busy>> {
        let mut file = OpenOptions::new()
            .read(true)
            // Write access: NFS carries an exclusive lock out as an fcntl write lock.
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Ok(Err(Busy {
                    path: path.to_path_buf(),
                    holder: serde_json::from_str(text.trim()).ok(),
                }));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::io(
                    path,
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot lock it ({e}); the filesystem must support flock (on \
                             NFS: mounted without `nolock`)"
                        ),
                    ),
                ))
            }
        }
        let holder = Holder {
            pid: std::process::id(),
            host: hostname(),
            command: command.to_string(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let text = serde_json::to_string(&holder).expect("plain data") + "\n";
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(text.as_bytes()))
            .map_err(|e| Error::io(path, e))?;
        Ok(Ok(Lock { file }))
    }

    /// Who holds the lock of `path` now, if anyone (taken and released at once to find out).
    pub fn holder(path: &Path) -> Result<Option<Busy>> {
        if !path.exists() {
            return Ok(None);
        }
        Ok(Self::try_take(path, "probe")?.err())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Still held here: nobody reads a half-emptied file. Closing the file releases it.
        let _ = self.file.set_len(0);
    }
}

/// `train`'s lock of its output folder (created if missing). The error, exit 2, names the
/// folder and the process that holds it.
pub fn output_dir(dir: &Path) -> Result<Lock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    match Lock::try_take(&dir.join(TRAIN_LOCK), "train")? {
        Ok(lock) => Ok(lock),
        Err(busy) => Err(in_use(dir, &busy)),
    }
}

/// The lock file `train` holds in its output folder.
pub const TRAIN_LOCK: &str = ".train.lock";

/// The refusal of a folder another process trains in.
pub fn in_use(dir: &Path, busy: &Busy) -> Error {
    Error::Usage(format!(
        "{} is in use by {} (it holds {}). One run per output folder: wait for it to end, \
         or choose another output.dir (--output DIR); `plot`, `eval` and `encode` can read \
         the folder meanwhile",
        dir.display(),
        busy.who(),
        busy.path.display()
    ))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_refused_with_the_holder_until_the_first_lets_go() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join(".train.lock");
        let first = Lock::try_take(&path, "train").unwrap().unwrap();
        // Another open file description of the same file: what a second process has.
        let busy = Lock::try_take(&path, "train").unwrap().unwrap_err();
        let holder = busy.holder.clone().expect("the holder wrote its name");
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.command, "train");
        let who = busy.who();
        assert!(who.contains("pid") && who.contains(&hostname()), "{who}");
        assert!(Lock::holder(&path).unwrap().is_some());
        drop(first);
        assert!(path.exists(), "the file stays");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "emptied");
        assert!(Lock::holder(&path).unwrap().is_none());
        let again = Lock::try_take(&path, "train").unwrap();
        assert!(again.is_ok(), "free once released");
    }

    #[test]
    fn a_holder_that_wrote_nothing_is_reported_as_unknown() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("x.lock");
        let f = File::create(&path).unwrap();
        f.lock().unwrap();
        let busy = Lock::try_take(&path, "train").unwrap().unwrap_err();
        assert!(busy.holder.is_none());
        assert!(busy.who().contains("does not say"));
        let e = in_use(dir.path(), &busy).to_string();
        assert!(e.contains(&dir.path().display().to_string()) && e.contains("output.dir"));
    }
}
