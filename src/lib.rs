//! snapq: background tasks for one machine. A SQLite file is the queue; a single-threaded
//! foreman claims due tasks and runs them on a bounded pool of worker threads, woken
//! through inotify by whoever enqueues. See ARCHITECTURE.md for the map.
//!
//! A program with tasks of its own registers them and runs a foreman with them:
//!
//! ```no_run
//! use snapq::registry::{Kind, Param, Registry, TaskSpec};
//! let mut registry = Registry::with_builtins();
//! registry.register(
//!     TaskSpec {
//!         name: "greet".into(),
//!         summary: "prints a greeting".into(),
//!         params: vec![Param::required("who", Kind::String)],
//!         retry: None,
//!     },
//!     |_ctx, args| {
//!         println!("hello, {}", args.str("who").unwrap_or("world"));
//!         Ok(())
//!     },
//! );
//! ```

pub mod backend;
pub mod brokers;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod db;
mod due;
pub mod error;
pub mod foreman;
mod heartbeat;
pub mod live;
pub mod logging;
pub mod monitor;
pub mod outbox;
pub mod panic;
pub mod panic_configs;
pub mod pidfile;
pub mod pool;
pub mod queue;
pub mod rabbitmq;
pub mod records;
pub mod registry;
pub mod schedules;
mod signals;
pub mod sink;
pub mod spawn;
pub mod stats;
pub mod status;
pub mod systemd;
pub mod tasks_file;
pub mod telemetry;
pub mod wakeup;

/// README.md's Rust examples, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use error::{Error, Result};
pub use foreman::{ForemanConfig, Stopped};
pub use queue::{Enqueuer, NewTask, When};
pub use registry::Registry;
