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
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
        let existed = path.is_dir();
        if let Err(e) = std::fs::create_dir_all(path) {
            return Err(unusable(format!(
                "cannot be created ({e}); give --wakeup-dir (or SNAPQ_WAKEUP_DIR) a writable \
                 directory, the same for the foreman and its enqueuers"
            )));
        }
        // Made here, in a directory its group may write (the service's home): every member
        // of that group must be able to wake the foreman, whoever made it.
        if !existed
            && let Some(group) = path.parent().and_then(crate::config::sharing_group)
            && let Ok(dir) = std::fs::File::open(path)
        {
            let _ = crate::config::share_with(&dir, group, 0o2770);
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
    watcher: notify::RecommendedWatcher,
    path: PathBuf,
    /// The directory the watch is on, as (device, inode): a directory removed and made
    /// again under the same path is another one, and the watch is not on it.
    armed_on: (u64, u64),
    /// Set by the inotify thread when the watched directory itself is removed or moved
    /// away; taken by the foreman loop, which then arms the watch again (`rearm_if_gone`).
    /// A hint only (Relaxed): the loop also checks at every safety re-read.
    gone: Arc<AtomicBool>,
}

impl Watch {
    /// Starts watching `dir` (creating it if needed). Returns the watch and the receiver of
    /// wake tokens; the channel holds at most one token (see the module comment).
    pub fn start(dir: &Path) -> Result<(Watch, Receiver<()>)> {
        WakeDir::prepare(dir)?;
        // Capacity one: a token in the channel stands for "a drain is owed"; more would
        // only repeat it.
        let (tx, rx) = bounded::<()>(1);
        let gone = Arc::new(AtomicBool::new(false));
        let (watched, flag) = (dir.to_owned(), Arc::clone(&gone));
        let mut watcher =
            notify::recommended_watcher(move |event| on_event(&tx, &watched, &flag, event))
                .map_err(|e| Error::Runtime(format!("cannot start inotify: {e}")))?;
        let armed_on = arm(&mut watcher, dir)?;
        Ok((
            Watch {
                watcher,
                path: dir.to_owned(),
                armed_on,
                gone,
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

    /// Whether the inotify thread saw the directory go since the last call.
    pub fn saw_it_go(&self) -> bool {
        self.gone.swap(false, Ordering::Relaxed)
    }

    /// If the watched directory was removed (or replaced), makes it again and watches the
    /// new one, with a warning. Returns true when it did: wake-ups in between were lost, so
    /// the caller must re-read the queue. Without this a foreman would fall back to its 5 s
    /// safety re-read for good.
    pub fn rearm_if_gone(&mut self) -> Result<bool> {
        if dir_id(&self.path) == Some(self.armed_on) {
            return Ok(false);
        }
        // The old watch may be gone with its directory already; either way it is dropped.
        let _ = self.watcher.unwatch(&self.path);
        WakeDir::prepare(&self.path)?;
        self.armed_on = arm(&mut self.watcher, &self.path)?;
        tracing::warn!(
            dir = %self.path.display(),
            "the wake-up directory was removed or replaced; made it again and watching it \
             (something cleans it: keep it out of tmp cleaners, e.g. systemd's RuntimeDirectory)"
        );
        Ok(true)
    }
}

/// Watches `dir` and returns its (device, inode).
fn arm(watcher: &mut notify::RecommendedWatcher, dir: &Path) -> Result<(u64, u64)> {
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| {
            Error::Runtime(format!(
                "cannot watch {} with inotify ({e}); if the limit of watches is reached, \
                 raise fs.inotify.max_user_watches",
                dir.display()
            ))
        })?;
    dir_id(dir).ok_or_else(|| {
        Error::Runtime(format!(
            "the wake-up directory {} vanished as it was being watched",
            dir.display()
        ))
    })
}

fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

fn on_event(tx: &Sender<()>, dir: &Path, gone: &AtomicBool, event: notify::Result<Event>) {
    if let Ok(ev) = &event {
        let about_dir = ev.paths.iter().any(|p| p == dir);
        if about_dir
            && matches!(
                ev.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            )
        {
            gone.store(true, Ordering::Relaxed);
            wake_loop(tx);
            return;
        }
    }
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
        wake_loop(tx);
    }
}

fn wake_loop(tx: &Sender<()>) {
    match tx.try_send(()) {
        Ok(()) | Err(TrySendError::Full(())) => {}
        // The foreman has gone; nothing to wake.
        Err(TrySendError::Disconnected(())) => {}
    }
}
