//! Brokers that monitor results can go to (issue 14, item 6). The outbox and its publisher
//! (src/outbox.rs) are the same for all of them; a broker kind only connects and publishes.
//!
//! A kind is chosen by the URL's scheme (`amqp://` → RabbitMQ, `mqtt://` → MQTT). Adding
//! a broker is one file with a `BrokerKind` and its `Link`, and one line in `BROKERS`:
//! `snapq run --broker-url <scheme>://…` then uses it, with the outbox's guarantees
//! (nothing lost across an outage or a restart, in order, at least once), heartbeats and
//! pings, and its line in `snapq status`.

pub mod amqp;
pub mod mqtt;

use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::error::{Error, Result};

/// Every broker kind. One line per kind.
pub static BROKERS: &[&dyn BrokerKind] = &[&amqp::Rabbitmq, &mqtt::Mqtt];

/// One message to publish: (exchange, routing key, body). Exchange and routing key are
/// RabbitMQ's words (PANIC's layout); a kind maps them to its own addressing.
pub type Outgoing<'a> = (&'a str, &'a str, &'a str);

/// What a connection is for: the exchanges it publishes to (declared where the broker
/// has such a thing) and the (exchange, routing key) whose messages are pings.
pub struct Plan<'a> {
    pub exchanges: &'a [&'a str],
    pub ping: (&'a str, &'a str),
}

/// A kind of broker.
pub trait BrokerKind: Sync {
    /// Its name in `snapq status` (`amqp`) and the publisher thread's (`snapq-amqp`).
    fn name(&self) -> &'static str;
    /// What people call it, for messages ("RabbitMQ").
    fn title(&self) -> &'static str;
    /// The URL schemes it takes.
    fn schemes(&self) -> &'static [&'static str];
    /// An example URL, for error messages.
    fn example(&self) -> &'static str;
    /// Connects, sets up what `plan` says, and subscribes to pings.
    fn connect(&self, url: &str, plan: &Plan<'_>) -> std::result::Result<Box<dyn Link>, String>;
}

/// A batch sent and not yet confirmed.
pub trait InFlight {
    /// Waits until the broker has confirmed every message of the batch, within `timeout`.
    /// Any error means the connection is to be dropped and the batch sent again.
    fn wait(self: Box<Self>, timeout: Duration) -> std::result::Result<(), String>;
}

/// One live connection to a broker, used by the publisher thread alone.
pub trait Link {
    /// Sends each message durably (persistent, or QoS 1), in order, without waiting for
    /// the broker's confirms (sending itself is bounded by `timeout`). At most two batches
    /// are in flight at once: the outbox sends the next while it waits for this one.
    fn publish<'a>(
        &'a self,
        messages: &[Outgoing<'_>],
        timeout: Duration,
    ) -> std::result::Result<Box<dyn InFlight + 'a>, String>;
    /// `publish`, then `wait`: returns once the broker has confirmed every message, all
    /// within `timeout`.
    fn publish_confirmed(
        &self,
        messages: &[Outgoing<'_>],
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let started = std::time::Instant::now();
        self.publish(messages, timeout)?
            .wait(timeout.saturating_sub(started.elapsed()))
    }
    /// The connection's errors as they happen (a closed socket, a broker that went), so a
    /// caller waiting on other channels can reconnect at once.
    fn errors(&self) -> &Receiver<String>;
    /// One message per ping received.
    fn pings(&self) -> &Receiver<()>;
    /// Closes the connection politely.
    fn close(self: Box<Self>);
}

/// The kind named `name` (as `snapq status` shows it).
pub fn by_name(name: &str) -> Option<&'static dyn BrokerKind> {
    BROKERS.iter().copied().find(|k| k.name() == name)
}

/// The kind whose scheme `url` has; `flag` names the option it came from.
pub fn for_url(flag: &str, url: &str) -> Result<&'static dyn BrokerKind> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let found = scheme
        .as_deref()
        .and_then(|s| BROKERS.iter().copied().find(|k| k.schemes().contains(&s)));
    found.ok_or_else(|| {
        let known: Vec<String> = BROKERS
            .iter()
            .map(|k| format!("{} for {}", k.example(), k.title()))
            .collect();
        Error::bad_input(
            flag,
            format!(
                "{url:?} is not a broker URL snapq knows; write e.g. {}",
                known.join(", or ")
            ),
        )
    })
}
