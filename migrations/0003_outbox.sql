-- The RabbitMQ sink's outbox (src/amqp.rs): results wait here, written in the transaction
-- that records their round, until the broker confirms them. Rows leave in id order.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- What a sink last said about itself (connected, disconnected and why), for `status`.
CREATE TABLE sink_status (
    sink       TEXT    PRIMARY KEY,
    state      TEXT    NOT NULL,
    detail     TEXT    NOT NULL,
    -- Results dropped, oldest first, because the outbox reached its cap.
    dropped    INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
);
