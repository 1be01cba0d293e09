//! Issues 17 and 19: the queue interface's conformance suite (src/backend/conformance.rs)
//! on each backend: SQLite (a real database file and a real inotify watch in a fresh home)
//! and RabbitMQ (the real broker, a queue of this run's own, deleted afterwards).

use snapq::backend::conformance::{self, Harness};
use snapq::backend::{QueueBackend, RabbitQueue, SqliteQueue};
use snapq::db::Synchronous;

use crate::amqp::BROKER;
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

/// Queue `name` on the test broker; the records in `home`'s database.
struct Rabbit {
    home: Home,
    name: String,
}

impl Harness for Rabbit {
    fn consumer(&self) -> Box<dyn QueueBackend> {
        Box::new(
            RabbitQueue::consumer(
                BROKER,
                &self.name,
                &self.home.db_path(),
                Synchronous::Normal,
                4,
            )
            .unwrap(),
        )
    }

    fn producer(&self) -> Box<dyn QueueBackend> {
        Box::new(RabbitQueue::producer(BROKER, &self.name).unwrap())
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let _ = snapq::backend::rabbitmq::delete_topology(BROKER, &self.name);
    }
}

#[test]
fn the_rabbitmq_backend_passes_the_conformance_suite() {
    conformance::run_all(&Rabbit {
        home: Home::new(),
        // Unique across runs: the broker keeps what earlier runs left.
        name: format!(
            "snapq-it-conformance-{}-{}",
            std::process::id(),
            snapq::clock::now_micros()
        ),
    });
}
