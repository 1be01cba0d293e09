//! Integration tests: the real `snapq` binary on a real SQLite file, real inotify and real
//! signals. One crate, one binary to link (STYLE 12).
#![allow(clippy::unwrap_used)]

mod amqp;
mod bad_input;
mod bad_rows;
mod browser;
mod burst;
mod commands;
mod conformance;
mod delay;
mod deps;
mod drain;
mod enqueue_faults;
mod fake_http;
mod first_hour;
mod library;
mod live;
mod monitors;
mod mqtt;
mod panic_configs;
mod pidfile;
mod protocol;
mod rabbitmq_queue;
mod race;
mod records;
mod retries;
mod schedules;
mod shared_group;
mod shutdown;
mod support;
mod systemd;
mod telemetry;
