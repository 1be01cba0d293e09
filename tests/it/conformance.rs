//! Issue 17: the queue interface's conformance suite (src/backend/conformance.rs) on the
//! SQLite backend: a real database file and a real inotify watch in a fresh home.

use snapq::backend::conformance::{self, Harness};
use snapq::backend::{QueueBackend, SqliteQueue};
use snapq::db::Synchronous;

use crate::support::Home;

struct Sqlite(Home);

impl Harness for Sqlite {
    fn consumer(&self) -> Box<dyn QueueBackend> {
        Box::new(
            SqliteQueue::consumer(
                &self.0.db_path(),
                &self.0.file("wakeup"),
                Synchronous::Normal,
            )
            .unwrap(),
        )
    }

    fn producer(&self) -> Box<dyn QueueBackend> {
        Box::new(
            SqliteQueue::producer(
                &self.0.db_path(),
                &self.0.file("wakeup"),
                Synchronous::Normal,
            )
            .unwrap(),
        )
    }
}

#[test]
fn the_sqlite_backend_passes_the_conformance_suite() {
    conformance::run_all(&Sqlite(Home::new()));
}
