//! Where monitor results go. A sink is called in two steps around the transaction that
//! records a round's result in the `monitors` table: `stage` inside it (a sink that keeps
//! an outbox in the same database writes there, so the result and its delivery commit or
//! fail together), then `committed` after it. The default sink appends JSON lines to
//! `results.jsonl`; RabbitMQ plugs in behind the same trait without touching monitor code.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Transaction;

use crate::error::{Error, Result};
use crate::monitor::RoundResult;

pub trait Sink: Send {
    /// Takes a result, inside the transaction that records it.
    fn stage(&mut self, tx: &Transaction<'_>, result: &RoundResult) -> Result<()>;
    /// The transaction committed: deliver what was staged.
    fn committed(&mut self) -> Result<()>;
}

/// `results.jsonl`: one JSON object a line, appended.
pub struct FileSink {
    path: PathBuf,
    /// Lines staged and not yet written.
    pending: String,
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
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(bad)?;
        Ok(FileSink {
            path: path.to_owned(),
            pending: String::new(),
        })
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

    fn committed(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // One write of whole lines: a reader tailing the file never sees half a line.
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(self.pending.as_bytes()));
        self.pending.clear();
        written.map_err(Error::io("appending to", &self.path))
    }
}
