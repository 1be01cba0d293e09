//! The one RabbitMQ connection code (lapin), for every part of snapq that talks to the
//! broker: the results sink (src/brokers/amqp.rs, src/outbox.rs), PANIC's configurations
//! (src/panic_configs.rs) and the task queue (src/backend/rabbitmq.rs).
//!
//! lapin is asynchronous; snapq's threads are not. Each call here drives lapin's futures to
//! completion with `block_on` on the calling thread, so a caller is a plain thread that
//! blocks in it, like any other I/O; a consumer's deliveries (`Deliveries`) are polled by
//! the thread that takes them, with a waker of its own. lapin itself runs on
//! async-global-executor (no tokio): one executor thread (`snapq-amqp-io`, set up once by
//! `connect`), async-io's reactor thread, and lapin's own I/O loop thread per connection.
//! lapin's automatic recovery is not used: snapq reconnects itself (src/outbox.rs,
//! `publish_loop`) and resends from its outbox, because a recovered channel does not
//! replay unconfirmed publishes.
//!
//! Errors come back as text naming what failed, for the log and `snapq status`; the URL in
//! them never carries its password (`redact`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Once;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use futures_lite::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm,
};

/// A message to publish: exchange, routing key, JSON body.
pub type Outgoing<'a> = (&'a str, &'a str, &'a str);

/// A message of a queue consumed with acknowledgements (`consume_queue`): its routing key,
/// its body, and what acknowledges it (`Broker::ack`). Until then the broker keeps it, and
/// hands it out again if this connection goes.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub routing_key: String,
    pub body: Vec<u8>,
    /// The broker handed it out before (to a consumer whose channel closed unacked).
    pub redelivered: bool,
    /// Its number on the channel that brought it (they grow in delivery order).
    pub delivery_tag: u64,
    acker: lapin::Acker,
}

/// Which deliveries of the channel `Broker::ack_and_confirm` acknowledges.
pub enum Acks<'a> {
    /// Every one still unacknowledged up to delivery tag `tag`, in one frame (AMQP's
    /// `multiple`): `count` deliveries, which the caller knows are all it means.
    UpTo { tag: u64, count: usize },
    /// These, one frame each.
    Each(&'a [&'a Incoming]),
}

/// What became of acks sent by `Broker::ack_and_confirm`: per message, whether its ack
/// was sent, and the round trip's result (Ok: the broker has taken every ack sent).
#[derive(Debug)]
pub struct Confirmed {
    pub sent: Vec<bool>,
    pub synced: Result<(), String>,
}

/// Wakes a thread parked in `Deliveries::take_waiting`.
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// The deliveries of one consumer (`Broker::consume`), oldest first.
pub struct Deliveries {
    consumer: lapin::Consumer,
    tag: String,
    /// Taken from the stream by `any` and not handed out yet.
    waiting: std::collections::VecDeque<Incoming>,
    /// The stream ended (the consumer was cancelled or its channel closed).
    ended: bool,
}

impl Deliveries {
    /// The consumer's tag (for `Broker::cancel`).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Up to `limit` deliveries received by now. When it finds none left, `cx`'s waker is
    /// woken by lapin's I/O loop at the next one.
    pub fn take(&mut self, limit: usize, cx: &mut Context<'_>) -> Vec<Incoming> {
        let mut got: Vec<Incoming> = Vec::new();
        while got.len() < limit {
            match self.waiting.pop_front() {
                Some(incoming) => got.push(incoming),
                None => break,
            }
        }
        while got.len() < limit && !self.ended {
            match Pin::new(&mut self.consumer).poll_next(cx) {
                Poll::Ready(Some(Ok(delivery))) => got.push(incoming(delivery)),
                // An error of the channel reaches the connection's error watch too.
                Poll::Ready(Some(Err(_)) | None) => self.ended = true,
                Poll::Pending => break,
            }
        }
        got
    }

    /// Up to `limit` deliveries, waiting up to `within` for the first if none has come:
    /// for a thread of its own that does nothing else meanwhile (it parks, and lapin's I/O
    /// loop unparks it). Empty if none came in time.
    pub fn take_waiting(&mut self, limit: usize, within: Duration) -> Vec<Incoming> {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let until = std::time::Instant::now() + within;
        loop {
            let got = self.take(limit, &mut cx);
            let left = until.saturating_duration_since(std::time::Instant::now());
            if !got.is_empty() || left.is_zero() {
                return got;
            }
            std::thread::park_timeout(left);
        }
    }

    /// Whether a delivery has been received and not taken.
    pub fn any(&mut self, cx: &mut Context<'_>) -> bool {
        if self.waiting.is_empty() {
            let more = self.take(1, cx);
            self.waiting.extend(more);
        }
        !self.waiting.is_empty()
    }
}

/// One connection with one channel in confirm mode.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    /// The connection's errors, posted by lapin's I/O loop as they happen (a broker that
    /// closed the connection, a cut socket): a caller waiting on other channels can select
    /// on this one too and reconnect at once. Unbounded, but a connection reports an
    /// error or two before it is dropped.
    errors: Receiver<String>,
}

/// The executor lapin spawns its tasks on: one thread, named, set up once per process.
static EXECUTOR: Once = Once::new();

impl Broker {
    /// Connects to `url` (amqp://user:password@host:port/vhost), opens a channel and puts
    /// it in confirm mode.
    pub fn connect(url: &str) -> Result<Broker, String> {
        Broker::connect_alarmed(url, None)
    }

    /// Like `connect`; each error of the connection also puts a token in `alarm` (a
    /// consumer waiting for deliveries learns at once that none will come).
    pub fn connect_alarmed(url: &str, alarm: Option<Sender<()>>) -> Result<Broker, String> {
        EXECUTOR.call_once(|| {
            async_global_executor::init_with_config(
                async_global_executor::GlobalExecutorConfig::default()
                    .with_min_threads(1)
                    .with_max_threads(1)
                    .with_thread_name_fn(|| "snapq-amqp-io".into()),
            );
        });
        async_global_executor::block_on(async {
            // lapin's default runtime with only its async-global-executor feature.
            let url = with_small_frames(url);
            let connection = Connection::connect(&url, ConnectionProperties::default())
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            let (tx, errors) = unbounded();
            watch_errors(&connection, tx, alarm);
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("cannot open a channel: {e}"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
            Ok(Broker {
                connection,
                channel,
                errors,
            })
        })
    }

    /// The connection's errors as they happen (see the field).
    pub fn errors(&self) -> &Receiver<String> {
        &self.errors
    }

    /// Declares a durable topic exchange (as PANIC declares its own).
    pub fn declare_topic_exchange(&self, name: &str) -> Result<(), String> {
        async_global_executor::block_on(self.channel.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ))
        .map_err(|e| format!("cannot declare the exchange {name}: {e}"))
    }

    /// Receives what is published on `exchange` under `binding`, through a queue of this
    /// connection's own (exclusive: it goes with the connection), without acks. The
    /// receiver's capacity bounds what waits for the caller; past it messages are dropped
    /// (pings and the like, where one waiting is as good as many). `map` makes of each
    /// message what the caller wants of it (on lapin's I/O thread: keep it short).
    pub fn subscribe<T: Send + 'static>(
        &self,
        exchange: &str,
        binding: &str,
        capacity: usize,
        map: fn(lapin::message::Delivery) -> T,
    ) -> Result<Receiver<T>, String> {
        let (tx, rx) = bounded(capacity);
        async_global_executor::block_on(async {
            let queue = self
                .channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot declare a queue for {exchange} / {binding}: {e}"))?;
            self.channel
                .queue_bind(
                    queue.name().clone(),
                    exchange.into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot bind a queue to {exchange} / {binding}: {e}"))?;
            let consumer = self
                .channel
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot consume {exchange} / {binding}: {e}"))?;
            forward(consumer, tx, map);
            Ok::<_, String>(())
        })?;
        Ok(rx)
    }

    /// Consumes the durable queue `queue`, bound to `exchange` with `binding`, with
    /// acknowledgements: each message stays the broker's until `ack`, and at most
    /// `prefetch` are handed out unacknowledged. The queue outlives the connection, so
    /// messages sent while snapq is down wait for it.
    pub fn consume_queue(
        &self,
        queue: &str,
        exchange: &str,
        binding: &str,
        prefetch: u16,
    ) -> Result<Receiver<Incoming>, String> {
        let (tx, rx) = bounded(usize::from(prefetch.max(1)));
        async_global_executor::block_on(async {
            self.channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot declare the queue {queue}: {e}"))?;
            self.channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot bind {queue} to {exchange} / {binding}: {e}"))?;
            self.channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| format!("cannot set the prefetch of {queue}: {e}"))?;
            let consumer = self
                .channel
                .basic_consume(
                    queue.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot consume {queue}: {e}"))?;
            forward(consumer, tx, incoming);
            Ok::<_, String>(())
        })?;
        Ok(rx)
    }

    /// Declares queue `name` (durable, with `arguments`: see `args`), or with `passive`
    /// only checks that it is there. Returns how many messages it holds ready (not those
    /// handed out and unacknowledged).
    pub fn declare_queue(
        &self,
        name: &str,
        passive: bool,
        arguments: FieldTable,
    ) -> Result<u32, String> {
        async_global_executor::block_on(self.channel.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                passive,
                ..QueueDeclareOptions::default()
            },
            arguments,
        ))
        .map(|q| q.message_count())
        .map_err(|e| format!("cannot declare the queue {name}: {e}"))
    }

    /// Binds queue `queue` to `exchange` under `key`.
    pub fn bind_queue(&self, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
        async_global_executor::block_on(self.channel.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .map_err(|e| format!("cannot bind {queue} to {exchange} / {key}: {e}"))
    }

    /// Binds exchange `destination` to exchange `source` under `key`.
    pub fn bind_exchange(&self, destination: &str, source: &str, key: &str) -> Result<(), String> {
        async_global_executor::block_on(self.channel.exchange_bind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ))
        .map_err(|e| format!("cannot bind {destination} to {source} / {key}: {e}"))
    }

    /// Deletes a queue and an exchange of that name, if there (tests clean up with it).
    pub fn delete(&self, queue: Option<&str>, exchange: Option<&str>) -> Result<(), String> {
        async_global_executor::block_on(async {
            if let Some(q) = queue {
                self.channel
                    .queue_delete(q.into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| format!("cannot delete the queue {q}: {e}"))?;
            }
            if let Some(x) = exchange {
                self.channel
                    .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                    .await
                    .map_err(|e| format!("cannot delete the exchange {x}: {e}"))?;
            }
            Ok(())
        })
    }

    /// Consumes queue `name` with a prefetch of `prefetch` unacknowledged messages. The
    /// deliveries are taken from the caller's thread (`Deliveries::take`), with no hop
    /// through lapin's executor: lapin's I/O loop wakes the caller's waker when one comes.
    pub fn consume(&self, name: &str, prefetch: u16) -> Result<Deliveries, String> {
        self.consume_with(name, prefetch, FieldTable::default())
    }

    /// `consume` with consumer `arguments` (see `args`; a stream's `x-stream-offset`).
    pub fn consume_with(
        &self,
        name: &str,
        prefetch: u16,
        arguments: FieldTable,
    ) -> Result<Deliveries, String> {
        async_global_executor::block_on(async {
            self.channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(|e| format!("cannot set the prefetch of {name}: {e}"))?;
            let consumer = self
                .channel
                .basic_consume(
                    name.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    arguments,
                )
                .await
                .map_err(|e| format!("cannot consume {name}: {e}"))?;
            Ok(Deliveries {
                tag: consumer.tag().to_string(),
                consumer,
                waiting: std::collections::VecDeque::new(),
                ended: false,
            })
        })
    }

    /// Stops consumer `tag`: the broker hands it nothing more.
    pub fn cancel(&self, tag: &str) -> Result<(), String> {
        async_global_executor::block_on(
            self.channel
                .basic_cancel(tag.into(), BasicCancelOptions::default()),
        )
        .map_err(|e| format!("cannot cancel the consumer: {e}"))
    }

    /// Acknowledges deliveries of this channel and makes a round trip behind the acks (a
    /// `basic.qos` that sets the prefetch to `prefetch` again, which changes nothing): when
    /// the broker answers it, it has processed every ack (acks have no reply of their own).
    /// One wait on lapin's executor for all of it.
    pub fn ack_and_confirm(&self, acks: Acks<'_>, prefetch: u16) -> Confirmed {
        let channel = &self.channel;
        let qos = BasicQosOptions { global: false };
        async_global_executor::block_on(async move {
            match acks {
                Acks::UpTo { tag, count } => {
                    // Both methods' frames are queued at the first poll, the ack's first
                    // (`zip` polls in order), so the broker answers the second after it has
                    // taken the first: one round trip for the batch.
                    let ack = channel.basic_ack(tag, BasicAckOptions { multiple: true });
                    let sync = channel.basic_qos(prefetch, qos);
                    let (acked, synced) = futures_lite::future::zip(ack, sync).await;
                    match acked {
                        Err(e) => Confirmed {
                            sent: vec![false; count],
                            synced: Err(format!("cannot acknowledge messages: {e}")),
                        },
                        Ok(()) => Confirmed {
                            sent: vec![true; count],
                            synced: synced.map_err(|e| format!("the broker did not answer: {e}")),
                        },
                    }
                }
                Acks::Each(messages) => {
                    let mut sent = Vec::with_capacity(messages.len());
                    for m in messages {
                        // An ack goes through lapin's I/O loop and resolves once written,
                        // without a reply; the round trip is sent after the last.
                        sent.push(matches!(
                            m.acker.ack(BasicAckOptions::default()).await,
                            Ok(true)
                        ));
                    }
                    let synced = if sent.iter().any(|&s| s) {
                        channel
                            .basic_qos(prefetch, qos)
                            .await
                            .map_err(|e| format!("the broker did not answer: {e}"))
                    } else {
                        Ok(())
                    };
                    Confirmed { sent, synced }
                }
            }
        })
    }

    /// A round trip on the channel: when it returns, the broker has processed every method
    /// sent before it on this channel (acks have no reply of their own). Sets the prefetch
    /// to `prefetch` again, which changes nothing.
    pub fn sync(&self, prefetch: u16) -> Result<(), String> {
        async_global_executor::block_on(
            self.channel
                .basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .map_err(|e| format!("the broker did not answer: {e}"))
    }

    /// Acknowledges a message of `consume_queue`: the broker forgets it. An error if the
    /// ack could not be sent, including when the channel that brought the message is gone
    /// (lapin then reports the ack as not used): the broker hands that message out again.
    pub fn ack(&self, incoming: &Incoming) -> Result<(), String> {
        match async_global_executor::block_on(incoming.acker.ack(BasicAckOptions::default())) {
            Ok(true) => Ok(()),
            Ok(false) => Err(
                "cannot acknowledge a message: the channel that brought it is gone (the \
                 broker hands it out again)"
                    .into(),
            ),
            Err(e) => Err(format!("cannot acknowledge a message: {e}")),
        }
    }

    /// Publishes each message as persistent JSON, then waits until the broker has
    /// confirmed every one of them; all of it within `timeout`. A nack, a closed connection or the
    /// timeout is an error: the caller sends the batch again on a new connection.
    pub fn publish_confirmed(
        &self,
        messages: &[Outgoing<'_>],
        timeout: Duration,
    ) -> Result<(), String> {
        let started = std::time::Instant::now();
        let confirms = self.publish(messages, timeout)?;
        confirms.wait(timeout.saturating_sub(started.elapsed()))
    }

    /// Publishes each message as persistent JSON and returns once lapin's I/O loop has
    /// them all, without waiting for the broker's confirms: `Confirms::wait` does. The
    /// next batch can go out meanwhile (the outbox keeps one batch in flight). Sending is
    /// bounded by `timeout`: a broker that stops reading the socket must not hold the
    /// thread.
    pub fn publish(
        &self,
        messages: &[Outgoing<'_>],
        timeout: Duration,
    ) -> Result<Confirms, String> {
        let work = async {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            // Every publish is started before any is awaited: each one's first poll queues
            // its frames for lapin's I/O loop, in the order of `messages` (the outbox's), and
            // then waits for the loop to have written them. Awaited one by one, each publish
            // was a round trip to that thread, one per message of the batch.
            let mut publishing: Vec<_> = messages
                .iter()
                .map(|(exchange, key, body)| {
                    Box::pin(self.channel.basic_publish(
                        (*exchange).into(),
                        (*key).into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        properties.clone(),
                    ))
                })
                .collect();
            let mut sent: Vec<Option<lapin::Result<PublisherConfirm>>> =
                messages.iter().map(|_| None).collect();
            std::future::poll_fn(|cx| {
                let mut done = true;
                for (future, result) in publishing.iter_mut().zip(sent.iter_mut()) {
                    if result.is_none() {
                        match future.as_mut().poll(cx) {
                            Poll::Ready(r) => *result = Some(r),
                            Poll::Pending => done = false,
                        }
                    }
                }
                if done { Poll::Ready(()) } else { Poll::Pending }
            })
            .await;
            let mut pending = Vec::with_capacity(messages.len());
            for (result, (exchange, key, _)) in sent.into_iter().zip(messages) {
                // (poll_fn above returned only once every publish had its result.)
                let confirm = result
                    .ok_or_else(|| format!("publishing to {exchange} / {key} did not end"))?
                    .map_err(|e| format!("publishing to {exchange} / {key} failed: {e}"))?;
                pending.push((confirm, format!("{exchange} / {key}")));
            }
            Ok(Confirms { pending })
        };
        let late = async {
            async_io::Timer::after(timeout).await;
            Err(format!(
                "the batch could not be sent within {} s",
                timeout.as_secs()
            ))
        };
        async_global_executor::block_on(futures_lite::future::or(work, late))
    }

    /// Publishes `body` (persistent JSON) to `exchange` with routing key `key` and waits
    /// for nothing: its frames are handed to lapin's I/O loop, which writes them with this
    /// channel's next frames, and the broker's confirm is not awaited. For what may be lost
    /// with the connection: the task queue's outcome events, which add no wait to a claim.
    pub fn publish_and_go(&self, exchange: &str, key: &str, body: &[u8]) {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let publish = self.channel.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        );
        // The first poll queues the frames (lapin's `send_method_frame_with_body`); what is
        // left to wait for is the broker's confirm.
        let mut publish = std::pin::pin!(publish);
        let _ = publish
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()));
    }

    /// Closes the connection (politely; errors do not matter then).
    pub fn close(self) {
        let _ = async_global_executor::block_on(self.connection.close(200, "bye".into()));
    }
}

/// The wait before reconnecting to a broker: 0.5 s after a connection that worked, then
/// doubling up to 30 s while attempts fail. Shared by everything that keeps a broker
/// connection (src/outbox.rs, src/panic_configs.rs).
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Backoff {
        Backoff(Backoff::MIN)
    }

    /// How long to wait now.
    pub fn wait(self) -> Duration {
        self.0
    }

    /// An attempt failed: the next wait is longer.
    pub fn failed(&mut self) {
        self.0 = (self.0 * 2).min(Backoff::MAX);
    }

    /// A connection worked: start again from the shortest wait.
    pub fn reset(&mut self) {
        self.0 = Backoff::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

/// A published batch's confirms, each with the (exchange / routing key) it is for.
pub struct Confirms {
    pending: Vec<(PublisherConfirm, String)>,
}

impl Confirms {
    /// Waits until the broker has confirmed every message, within `timeout`. A nack, a
    /// closed connection or the timeout is an error: the caller sends the batch again on
    /// a new connection.
    pub fn wait(self, timeout: Duration) -> Result<(), String> {
        let work = async {
            for (confirm, target) in self.pending {
                let confirmation = confirm
                    .await
                    .map_err(|e| format!("no confirm for {target}: {e}"))?;
                if !confirmation.is_ack() {
                    return Err(format!("the broker refused a message to {target}"));
                }
            }
            Ok(())
        };
        let late = async {
            async_io::Timer::after(timeout).await;
            Err(format!(
                "the batch was not confirmed within {} s",
                timeout.as_secs()
            ))
        };
        async_global_executor::block_on(futures_lite::future::or(work, late))
    }
}

/// A delivery as snapq keeps it.
fn incoming(delivery: lapin::message::Delivery) -> Incoming {
    Incoming {
        routing_key: delivery.routing_key.to_string(),
        body: delivery.data,
        redelivered: delivery.redelivered,
        delivery_tag: delivery.delivery_tag,
        acker: delivery.acker,
    }
}

/// Queue arguments from (name, value) pairs: text or a number.
pub fn args(pairs: &[(&str, ArgValue<'_>)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        let value = match value {
            ArgValue::Text(t) => AMQPValue::LongString((*t).into()),
            ArgValue::Number(n) => AMQPValue::LongLongInt(*n),
            ArgValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        };
        table.insert((*name).into(), value);
    }
    table
}

/// A queue argument's value (`args`).
#[derive(Debug, Clone, Copy)]
pub enum ArgValue<'a> {
    Text(&'a str),
    Number(i64),
    /// Unix seconds (a stream consumer's `x-stream-offset`).
    Timestamp(u64),
}

/// Posts the connection's errors to `tx` as text, from a task on lapin's executor.
fn watch_errors(connection: &Connection, tx: Sender<String>, alarm: Option<Sender<()>>) {
    let mut events = connection.events_listener();
    async_global_executor::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                if tx.send(format!("the connection failed: {e}")).is_err() {
                    return;
                }
                if let Some(alarm) = &alarm {
                    let _ = alarm.try_send(());
                }
            }
        }
    })
    .detach();
}

/// Hands a consumer's deliveries to `tx`, from a task on lapin's executor; drops what does
/// not fit (see `Broker::subscribe`).
fn forward<T: Send + 'static>(
    mut consumer: lapin::Consumer,
    tx: Sender<T>,
    map: fn(lapin::message::Delivery) -> T,
) {
    async_global_executor::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if let Err(crossbeam_channel::TrySendError::Disconnected(_)) =
                tx.try_send(map(delivery))
            {
                return;
            }
        }
    })
    .detach();
}

/// lapin keeps a receive and a send buffer of 32 frames each, and a frame is as large as
/// the broker allows (RabbitMQ: 128 KiB): 8 MiB of a foreman's memory for messages of a
/// few hundred bytes. Unless the URL says otherwise, snapq asks for 16 KiB frames (larger
/// messages travel as several): 1 MiB of buffers.
fn with_small_frames(url: &str) -> String {
    if url.contains("frame_max=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}frame_max={SMALL_FRAME_MAX}")
}

const SMALL_FRAME_MAX: u32 = 16_384;

/// The URL without its password, for logs and `status`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_small_unless_the_url_says() {
        assert_eq!(
            with_small_frames("amqp://h/%2f"),
            "amqp://h/%2f?frame_max=16384"
        );
        assert_eq!(
            with_small_frames("amqp://h/%2f?heartbeat=10"),
            "amqp://h/%2f?heartbeat=10&frame_max=16384"
        );
        assert_eq!(
            with_small_frames("amqp://h?frame_max=8192"),
            "amqp://h?frame_max=8192"
        );
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
