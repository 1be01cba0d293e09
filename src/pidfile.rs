//! The pid file (invariant 4).
//!
//! The file is held with an exclusive `flock` for the foreman's lifetime. The kernel drops
//! the lock when the process dies, even by `kill -9`, so a lock that cannot be taken means
//! a live foreman, with no race between two foremen starting at once. An unlocked file is
//! left over; it is still refused if it names a live snapq process (one that holds no lock
//! on it, e.g. started with another pid-file path), and otherwise replaced with a warning.
//! A lock held while the file names no running foreman is waited for, briefly: the holder
//! is a command the dead foreman was starting (`acquire`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a pid file locked by no running foreman is waited for (see `acquire`).
const LEFTOVER_HOLDER_WAIT: Duration = Duration::from_secs(2);

/// A held pid file; dropping it removes the file and releases the lock.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// Holds the flock; closed (and the lock released) after the file is removed.
    _file: File,
}

impl PidFile {
    pub fn acquire(path: &Path) -> Result<PidFile> {
        let bad = |problem: String| Error::BadPath {
            role: "pid file",
            path: path.to_owned(),
            problem,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                bad(format!(
                    "its directory cannot be created ({e}); give --pid-file a writable place \
                     or use --no-pid-file"
                ))
            })?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| {
                bad(format!(
                    "cannot be opened ({e}); give --pid-file a writable place or use --no-pid-file"
                ))
            })?;
        let mut content = String::new();
        let mut locked = try_lock(&file);
        let _ = file.read_to_string(&mut content);
        let recorded: Option<i32> = content.trim().parse().ok();
        let me = std::process::id() as i32;
        // Held, but not by the foreman the file names: a command that a foreman killed
        // with -9 was starting holds the lock too (between its clone and its exec the child
        // has the foreman's descriptors, src/spawn.rs) until its parent-death signal ends
        // it or its exec closes the file, moments later. A restart right after the kill
        // (systemd's, a test's) waits for that rather than report a foreman that is gone.
        if !locked && recorded.is_none_or(|pid| pid != me && !is_snapq_foreman(pid)) {
            let until = Instant::now() + LEFTOVER_HOLDER_WAIT;
            while !locked && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
                locked = try_lock(&file);
            }
        }
        if !locked {
            return Err(Error::ForemanRunning {
                pid: recorded.unwrap_or(0),
                path: path.to_owned(),
            });
        }
        match recorded {
            Some(pid) if pid != me && is_snapq_foreman(pid) => {
                return Err(Error::ForemanRunning {
                    pid,
                    path: path.to_owned(),
                });
            }
            Some(pid) if pid != me => {
                let why = if process_exists(pid) {
                    "is not a snapq process"
                } else {
                    "is not running"
                };
                tracing::warn!(path = %path.display(), pid, "replacing a stale pid file: pid {pid} {why}");
            }
            None if !content.trim().is_empty() => {
                tracing::warn!(path = %path.display(), "replacing a pid file that holds no pid: {:?}", content.trim());
            }
            _ => {}
        }
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(format!("{me}\n").as_bytes())?;
            file.flush()
        };
        write(&mut file).map_err(Error::io("writing the pid file", path))?;
        Ok(PidFile {
            path: path.to_owned(),
            _file: file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while the lock is still held, so no other foreman can have taken it.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "could not remove the pid file: {e}");
        }
    }
}

/// Takes the exclusive lock on `file` if no other open file description holds it.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock(2) on a descriptor the caller owns; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether a process with this pid exists (EPERM: it exists but is another user's).
pub fn process_exists(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the pid exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether the process runs: it exists and is not a zombie (one that ended and that its
/// parent, or whoever inherited it, has not reaped yet).
pub fn process_runs(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any.
        Ok(stat) if pid > 0 => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        _ => false,
    }
}

/// Whether `pid` is a live process running a snapq binary.
/// Whether `pid` is a snapq foreman: a snapq process (`is_snapq_process`) whose command
/// line has `run`. A stale pid file or heartbeat names a pid the kernel may since have
/// given to another process, and on a busy machine (thousands of short processes a
/// second: command tasks, scripts calling `snapq show`) that is soon another snapq
/// command; only a foreman counts as the one the file or row meant.
pub fn is_snapq_foreman(pid: i32) -> bool {
    is_snapq_process(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .skip(1)
            .any(|arg| arg == b"run")
}

pub fn is_snapq_process(pid: i32) -> bool {
    if !process_exists(pid) {
        return false;
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
    if comm.trim() == "snapq" {
        return true;
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let argv0 = Path::new(std::ffi::OsStr::from_bytes(argv0));
    argv0.file_name().is_some_and(|n| n == "snapq")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_file_refuses_a_second_holder_and_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("snapq.pid");
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just as another process would.
        let err = PidFile::acquire(&path).unwrap_err();
        assert!(matches!(err, Error::ForemanRunning { .. }), "{err}");
        drop(held);
        assert!(!path.exists());
    }

    #[test]
    fn stale_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapq.pid");
        // pid 1 exists but is not snapq; a huge pid does not exist.
        for stale in ["1\n", "999999999\n", "garbage"] {
            std::fs::write(&path, stale).unwrap();
            let held = PidFile::acquire(&path).unwrap();
            drop(held);
        }
    }
}
