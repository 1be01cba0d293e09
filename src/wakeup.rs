//! The wake-up protocol (invariant 5), both sides.
//!
//! Writer: commit the row, then create `wakeup/wake` with O_CREAT|O_EXCL. If the file
//! already exists the writer is done: the foreman has not consumed that file yet, and it
//! removes the file *before* it re-reads the queue, so that re-read starts after this
//! writer's commit and sees the row. A burst of enqueues thus creates one file, not one per
//! task (creating a file costs 20–600 µs on ext4, MEASUREMENTS.md); a failed O_EXCL create
//! costs a couple of microseconds. Any other file created in (or moved into) the directory
//! wakes the foreman too, so writers in other languages may use unique names.
//!
//! Reader: the `notify` crate's inotify thread calls `on_event`, which removes the file
//! that appeared and *then* posts a token on a channel of capacity one. The foreman loop
//! drains the queue after receiving the token, so removal happens before the drain that
//! answers it. A token already waiting in the channel means a drain that has not started
//! yet: dropping the second token loses nothing. An event-queue overflow or a watcher error
//! posts a token as well (it means "rescan").

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use notify::event::{EventKind, ModifyKind};
use notify::{Event, RecursiveMode, Watcher};

use crate::error::{Error, Result};

/// The file every snapq enqueuer creates.
pub const FLAG_FILE: &str = "wake";

/// The writer's side: a wake-up directory that has been checked to be usable.
#[derive(Debug, Clone)]
pub struct WakeDir {
    /// The flag file every snapq enqueuer creates.
    flag: PathBuf,
}

impl WakeDir {
    /// Creates the directory if needed and checks that files can be created in it, so an
    /// enqueue fails before it writes a row rather than after.
    pub fn prepare(path: &Path) -> Result<WakeDir> {
        let unusable = |problem: String| Error::BadPath {
            role: "wake-up directory",
            path: path.to_owned(),
            problem,
        };
        if let Err(e) = std::fs::create_dir_all(path) {
            return Err(unusable(format!(
                "cannot be created ({e}); give --wakeup-dir (or SNAPQ_WAKEUP_DIR) a writable \
                 directory, the same for the foreman and its enqueuers"
            )));
        }
        if !path.is_dir() {
            return Err(unusable("is not a directory".into()));
        }
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| unusable("contains a NUL byte".into()))?;
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call;
        // access(2) only reads it.
        if unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(unusable(format!(
                "is not writable ({e}); fix its permissions (enqueuers need write access, \
                 e.g. through a shared group) or point --wakeup-dir elsewhere"
            )));
        }
        Ok(WakeDir {
            flag: path.join(FLAG_FILE),
        })
    }

    /// Tells a foreman watching this directory that rows were committed. Call it after the
    /// commit, never before.
    pub fn wake(&self) -> Result<()> {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.flag)
        {
            Ok(_) => Ok(()),
            // Not yet consumed: the foreman's next drain comes after our commit (see top).
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::Io {
                context: "creating the wake-up file",
                path: self.flag.clone(),
                source: e,
            }),
        }
    }
}

impl WakeDir {
    /// `wake`, after a commit: what was committed stays committed whatever happens here, so
    /// a failure is a warning on stderr, never an error. A command that reported a stored
    /// task as failed would have it stored (and run) again by a script that retries on
    /// failure. `what` says what was stored ("the task is").
    pub fn wake_after_commit(&self, what: &str) {
        if let Err(e) = self.wake() {
            tracing::warn!(
                "{what} stored, but the foreman was not woken ({e}); it will see the change \
                 within its 5 s safety re-read. Check the wake-up directory (free space and \
                 inodes, permissions)"
            );
        }
    }
}

/// The reader's side: an inotify watch on the directory that posts wake tokens.
pub struct Watch {
    /// Dropping the watcher stops its thread and closes the inotify descriptor.
    _watcher: notify::RecommendedWatcher,
    path: PathBuf,
}

impl Watch {
    /// Starts watching `dir` (creating it if needed). Returns the watch and the receiver of
    /// wake tokens; the channel holds at most one token (see the module comment).
    pub fn start(dir: &Path) -> Result<(Watch, Receiver<()>)> {
        WakeDir::prepare(dir)?;
        // Capacity one: a token in the channel stands for "a drain is owed"; more would
        // only repeat it.
        let (tx, rx) = bounded::<()>(1);
        let mut watcher = notify::recommended_watcher(move |event| on_event(&tx, event))
            .map_err(|e| Error::Runtime(format!("cannot start inotify: {e}")))?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| {
                Error::Runtime(format!(
                    "cannot watch {} with inotify ({e}); if the limit of watches is reached, \
                     raise fs.inotify.max_user_watches",
                    dir.display()
                ))
            })?;
        Ok((
            Watch {
                _watcher: watcher,
                path: dir.to_owned(),
            },
            rx,
        ))
    }

    /// Removes the files left by earlier runs. Call it after `start` and before the first
    /// drain: a file created in between is then either seen by the watch or removed here,
    /// and its row is read by that first drain either way.
    pub fn clear_backlog(&self) -> Result<usize> {
        let entries = std::fs::read_dir(&self.path)
            .map_err(Error::io("reading the wake-up directory", &self.path))?;
        let mut removed = 0;
        for entry in entries.flatten() {
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn on_event(tx: &Sender<()>, event: notify::Result<Event>) {
    let wake = match &event {
        // An error of the watcher may mean lost events: rescan.
        Err(_) => true,
        Ok(ev) if ev.need_rescan() => true,
        Ok(ev) => match ev.kind {
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                for path in &ev.paths {
                    // Removed before the token is posted (module comment). A file that is
                    // already gone (moved out, removed by a writer) is no matter.
                    let _ = std::fs::remove_file(path);
                }
                true
            }
            // Our own removals, opens and closes carry no news.
            EventKind::Remove(_) | EventKind::Access(_) => false,
            EventKind::Modify(_) | EventKind::Any | EventKind::Other => true,
        },
    };
    if wake {
        match tx.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            // The foreman has gone; nothing to wake.
            Err(TrySendError::Disconnected(())) => {}
        }
    }
}
