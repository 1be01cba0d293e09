//! RabbitMQ as a broker kind: the outbox's messages go to durable topic exchanges as
//! persistent messages with publisher confirms, through the one RabbitMQ connection code
//! (src/rabbitmq.rs); pings come on an exclusive queue bound to the ping routing key.

use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{BrokerKind, InFlight, Link, Outgoing, Plan};
use crate::rabbitmq::{Broker, Confirms};

impl InFlight for Confirms {
    fn wait(self: Box<Self>, timeout: Duration) -> Result<(), String> {
        Confirms::wait(*self, timeout)
    }
}

pub struct Rabbitmq;

impl BrokerKind for Rabbitmq {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn title(&self) -> &'static str {
        "RabbitMQ"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["amqp", "amqps"]
    }

    fn example(&self) -> &'static str {
        "amqp://guest:guest@127.0.0.1:5672/%2f"
    }

    fn connect(&self, url: &str, plan: &Plan<'_>) -> Result<Box<dyn Link>, String> {
        let broker = Broker::connect(url)?;
        for exchange in plan.exchanges {
            broker.declare_topic_exchange(exchange)?;
        }
        broker.declare_topic_exchange(plan.ping.0)?;
        // One waiting ping is as good as many.
        let pings = broker.subscribe(plan.ping.0, plan.ping.1, 1, |_| ())?;
        Ok(Box::new(RabbitmqLink { broker, pings }))
    }
}

struct RabbitmqLink {
    broker: Broker,
    pings: Receiver<()>,
}

impl Link for RabbitmqLink {
    fn publish<'a>(
        &'a self,
        messages: &[Outgoing<'_>],
        timeout: Duration,
    ) -> Result<Box<dyn InFlight + 'a>, String> {
        Ok(Box::new(self.broker.publish(messages, timeout)?))
    }

    fn errors(&self) -> &Receiver<String> {
        self.broker.errors()
    }

    fn pings(&self) -> &Receiver<()> {
        &self.pings
    }

    fn close(self: Box<Self>) {
        self.broker.close();
    }
}
