//! Where monitor results go. A sink is called in two steps around the transaction that
//! records a round's result in the `monitors` table: `stage` inside it (a sink that keeps
//! an outbox in the same database writes there, so the result and its delivery commit or
//! fail together), then `committed` after it. The default sink appends JSON lines to
//! `results.jsonl`; RabbitMQ plugs in behind the same trait without touching monitor code.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rusqlite::Transaction;

use crate::error::{Error, Result};
use crate::monitor::RoundResult;

pub trait Sink: Send {
    /// Takes a result, inside the transaction that records it.
    fn stage(&mut self, tx: &Transaction<'_>, result: &RoundResult) -> Result<()>;
    /// The transaction committed: deliver what was staged.
    fn committed(&mut self) -> Result<()>;
    /// The transaction failed and was rolled back: forget what was staged (the same
    /// results are staged again when it is retried).
    fn rolled_back(&mut self);
}

/// `results.jsonl`: one JSON object a line, appended.
pub struct FileSink {
    path: PathBuf,
    /// Lines staged and not yet written.
    pending: String,
    /// The open file and its inode: reopened when the path names another file (rotated
    /// away by logrotate, or removed).
    file: Option<(std::fs::File, u64)>,
    /// When the path was last checked for a rotation: at most once a second, as a `stat`
    /// per round was 2% of the foreman's CPU with 1,000 monitors.
    checked: Option<std::time::Instant>,
}

impl FileSink {
    /// Checks that the file can be appended to (creating it and its directory).
    pub fn open(path: &Path) -> Result<FileSink> {
        let bad = |e: std::io::Error| Error::BadPath {
            role: "results file",
            path: path.to_owned(),
            problem: format!("cannot be appended to ({e}); check the home directory's permissions"),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(bad)?;
        }
        let mut sink = FileSink {
            path: path.to_owned(),
            pending: String::new(),
            file: None,
            checked: None,
        };
        sink.file().map_err(bad)?;
        Ok(sink)
    }

    /// The file to append to: the open one while the path still names it.
    fn file(&mut self) -> std::io::Result<&mut std::fs::File> {
        let due = self
            .checked
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        let stale = match &self.file {
            None => true,
            Some(_) if !due => false,
            Some((_, ino)) => {
                self.checked = Some(std::time::Instant::now());
                std::fs::metadata(&self.path).ok().map(|m| m.ino()) != Some(*ino)
            }
        };
        if stale {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let ino = file.metadata()?.ino();
            self.file = Some((file, ino));
        }
        match &mut self.file {
            Some((file, _)) => Ok(file),
            None => Err(std::io::Error::other("the results file is not open")),
        }
    }
}

impl Sink for FileSink {
    fn stage(&mut self, _tx: &Transaction<'_>, result: &RoundResult) -> Result<()> {
        let line = serde_json::to_string(result)
            .map_err(|e| Error::Runtime(format!("serialising a monitor result: {e}")))?;
        self.pending.push_str(&line);
        self.pending.push('\n');
        Ok(())
    }

    fn rolled_back(&mut self) {
        self.pending.clear();
    }

    fn committed(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // One write of whole lines: a reader tailing the file never sees half a line.
        let pending = std::mem::take(&mut self.pending);
        let written = self.file().and_then(|f| f.write_all(pending.as_bytes()));
        written.map_err(Error::io("appending to", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str) -> RoundResult {
        RoundResult {
            monitor: name.into(),
            kind: "http".into(),
            version: 1,
            ok: true,
            started_at: "2026-11-23T00:00:00Z".into(),
            duration_ms: 1.0,
            data: Some(serde_json::json!({"status": 200})),
            error: None,
            panic: None,
        }
    }

    fn deliver(sink: &mut FileSink, name: &str) {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        sink.stage(&tx, &result(name)).unwrap();
        tx.commit().unwrap();
        sink.committed().unwrap();
    }

    #[test]
    fn appends_lines_and_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut sink = FileSink::open(&path).unwrap();
        deliver(&mut sink, "a");
        deliver(&mut sink, "b");
        std::fs::rename(&path, dir.path().join("results.jsonl.1")).unwrap();
        // Rotation is noticed within a second.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        deliver(&mut sink, "c");
        let old = std::fs::read_to_string(dir.path().join("results.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old.lines().count(), 2);
        assert_eq!(new.lines().count(), 1);
        let line: serde_json::Value = serde_json::from_str(new.trim()).unwrap();
        assert_eq!(line["monitor"], "c");
        assert!(line.get("error").is_none());
    }
}
