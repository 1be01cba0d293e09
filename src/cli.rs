//! The command line (SPEC "Command line"): clap parses into `Cli`, `Paths::resolve` turns
//! the path flags into a layout, each command runs, and `main` maps the result to an exit
//! status in one place.

use std::io::{BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::FalseyValueParser;
use clap::{Args, Parser, Subcommand};

use crate::backend::QueueTarget;
use crate::clock;
use crate::config::{PathOverrides, Paths};
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::foreman::{self, ForemanConfig};
use crate::live::{Limits, LiveConfig};
use crate::logging::{self, LogFormat};
use crate::queue::{self, Catalog, Enqueuer, NewTask, When};
use crate::registry::Registry;
use crate::stats;
use crate::status;
use crate::wakeup::WakeDir;

#[derive(Debug, Parser)]
#[command(
    name = "snapq",
    version,
    about = "Background tasks for one machine: a SQLite file is the queue, inotify wakes the foreman.",
    after_help = "Every setting of `run` and every global option can also be set as SNAPQ_<FLAG> \
                  (e.g. SNAPQ_HOME, SNAPQ_WORKERS; each option's help names its variable); a flag \
                  wins over the environment.\n\
                  Exit status: 0 success, 2 bad usage or input (nothing was written), 3 `run --burst` \
                  ran tasks that failed, 1 any other failure."
)]
pub struct Cli {
    #[command(
        flatten,
        next_help_heading = "Global options (before or after the command)"
    )]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Directory holding the database, wake-up directory, pid file and telemetry
    /// [default: $XDG_STATE_HOME/snapq, else ~/.local/state/snapq]
    #[arg(long, env = "SNAPQ_HOME", global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// The SQLite database (the queue, the task records, monitors and schedules)
    /// [default: HOME/snapq.sqlite3]
    #[arg(long, env = "SNAPQ_DB", global = true, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Where the task queue is: sqlite:PATH (a database, as --db) or
    /// amqp://USER:PASSWORD@HOST:PORT/VHOST (RabbitMQ: foremen on several machines share
    /// it; the database keeps each one's records) [default: the database]
    #[arg(long, env = "SNAPQ_QUEUE", global = true, value_name = "URL")]
    pub queue: Option<String>,
    /// The RabbitMQ queue's name, with --queue amqp://…
    #[arg(
        long,
        env = "SNAPQ_QUEUE_NAME",
        global = true,
        value_name = "NAME",
        default_value = crate::backend::rabbitmq::DEFAULT_QUEUE_NAME
    )]
    pub queue_name: String,
    /// Directory whose new files wake the foreman; enqueuers must use the foreman's
    /// (best on tmpfs, e.g. /run/snapq/wakeup) [default: HOME/wakeup]
    #[arg(long, env = "SNAPQ_WAKEUP_DIR", global = true, value_name = "DIR")]
    pub wakeup_dir: Option<PathBuf>,
    /// The foreman's pid file [default: HOME/snapq.pid]
    #[arg(long, env = "SNAPQ_PID_FILE", global = true, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Write no pid file (for supervisors that track the process themselves)
    #[arg(long, env = "SNAPQ_NO_PID_FILE", global = true, value_parser = FalseyValueParser::new())]
    pub no_pid_file: bool,
    /// Directory for telemetry CSV files [default: HOME/telemetry]
    #[arg(long, env = "SNAPQ_TELEMETRY_DIR", global = true, value_name = "DIR")]
    pub telemetry_dir: Option<PathBuf>,
    /// Command task definitions (TOML; README "Your own tasks"), read by the foreman and
    /// by enqueuers [default: HOME/tasks.toml, if it exists]
    #[arg(long, env = "SNAPQ_TASKS", global = true, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
    /// What a commit survives: `full` fsyncs every commit (survives power loss); `normal`
    /// survives a crash of any process but power loss may roll back the last commits
    #[arg(
        long,
        env = "SNAPQ_SYNCHRONOUS",
        global = true,
        value_enum,
        default_value = "full"
    )]
    pub synchronous: Synchronous,
    /// Log lines as text or JSON (for log shippers); filter with RUST_LOG
    #[arg(
        long,
        env = "SNAPQ_LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the foreman: claim due tasks and run them on a pool of worker threads
    Run(RunArgs),
    /// Add a task (or many, from JSON Lines) and wake the foreman; prints the id (or count)
    Enqueue(EnqueueArgs),
    /// Show whether a foreman is alive and what the queue holds
    Status {
        /// Print one JSON document
        #[arg(long)]
        json: bool,
    },
    /// List the task names that can be enqueued, with their parameters
    Tasks {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Add, change, remove and list monitors (periodic checks run by the foreman)
    #[command(subcommand)]
    Monitor(MonitorCommand),
    /// Add, change, pause, remove and list schedules: a task enqueued by the foreman on a
    /// cron expression or at an interval
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Show one task wherever it is: queued (due when), running (since when, on which
    /// foreman), or how it ended (with --queue amqp://…, also a task another machine ran,
    /// from the ends foremen publish); exit 1 if there is no such task
    Show {
        /// The id `enqueue` printed
        id: i64,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Print a command task's output (the tail its record keeps: stdout and stderr as
    /// they came), as raw bytes; exit 1 if there is no such task
    Logs {
        /// The id `enqueue` printed
        id: i64,
    },
    /// Task records, newest first: id, task, state, finished, duration, error
    History {
        /// Only tasks in this state (repeat for several): queued (waiting for a retry),
        /// running, succeeded, failed, panicked, rejected, timed_out, abandoned, lost,
        /// cancelled, dead
        #[arg(long = "state", value_name = "STATE")]
        states: Vec<String>,
        /// Only tasks of this name
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
        /// Only tasks that ended (or started) in this recent past: seconds, or 90s, 15m, 2h, 1d
        #[arg(long, value_name = "DURATION", value_parser = recent)]
        since: Option<Duration>,
        /// At most this many
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Remove queued tasks (recorded as cancelled); a running task is refused with exit 1
    Cancel {
        /// The ids `enqueue` printed
        #[arg(required = true, value_name = "ID")]
        ids: Vec<i64>,
    },
    /// Enqueue again a task that ended failed, dead, lost, abandoned or timed_out: the same
    /// id, its next attempt, due now; exit 1 for a task in another state or no such task
    Retry {
        /// The id `enqueue` printed
        #[arg(value_name = "ID")]
        id: i64,
    },
    /// Summarise the telemetry: count, mean, p50, p95, p99, max per label, and the latest
    /// resource figures
    Stats {
        /// Print one JSON document
        #[arg(long)]
        json: bool,
        /// Only samples from this recent past: seconds, or with a unit (90s, 15m, 2h, 1d)
        #[arg(long, value_name = "DURATION", value_parser = recent)]
        since: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MonitorCommand {
    /// Add a monitor; its first round starts within a second. Kinds: chainlink_node,
    /// http, system
    Add {
        /// chainlink_node, http or system
        kind: String,
        /// A name of letters, digits, '_', '-' and '.'
        name: String,
        /// The kind's config, a JSON object, e.g. '{"node_prometheus_urls":
        /// ["http://127.0.0.1:6688/metrics"]}' (`system` needs none)
        #[arg(long, value_name = "JSON", default_value = "{}")]
        config: String,
        /// Seconds between rounds (fractions allowed)
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds,
              allow_negative_numbers = true)]
        interval: Duration,
    },
    /// Change a monitor's config or interval; the next round (within a second) uses it
    Update {
        /// The monitor's name
        name: String,
        /// The whole new config, a JSON object (as for `add`)
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// Seconds between rounds (fractions allowed)
        #[arg(long, value_name = "SECS", value_parser = seconds, allow_negative_numbers = true)]
        interval: Option<Duration>,
    },
    /// Remove a monitor: no further rounds; a running round's result is discarded
    Remove {
        /// The monitor's name
        name: String,
    },
    /// List monitors with their last status, value summary, error and run time
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show one monitor in full (JSON)
    Show {
        /// The monitor's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule: NAME fires TASK on --cron EXPR or --every SECS
    Add {
        /// A name of letters, digits, '_', '-' and '.'
        name: String,
        /// The task to enqueue at each tick (see `snapq tasks`)
        task: String,
        #[command(flatten)]
        spec: ScheduleSpec,
    },
    /// Change a schedule: what is given replaces what it had; the next tick is computed
    /// anew from now
    Update {
        /// The schedule's name
        name: String,
        /// The task to enqueue instead
        #[arg(long, value_name = "TASK")]
        task: Option<String>,
        #[command(flatten)]
        spec: ScheduleSpec,
    },
    /// Remove a schedule (tasks it enqueued stay)
    Remove {
        /// The schedule's name
        name: String,
    },
    /// Stop a schedule firing until `resume`
    Pause {
        /// The schedule's name
        name: String,
    },
    /// Fire a paused schedule again, from its next tick after now (no catch-up)
    Resume {
        /// The schedule's name
        name: String,
    },
    /// List schedules: when they fire, their task, next tick, last tick and its task's state
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule (JSON): its next five ticks, last tick, the task it enqueued and
    /// that task's state
    Show {
        /// The schedule's name
        name: String,
    },
}

/// When a schedule fires and what it enqueues (for `schedule add` and `update`).
#[derive(Debug, Args)]
pub struct ScheduleSpec {
    /// A 5-field cron expression (minute hour day-of-month month day-of-week), or @hourly,
    /// @daily, @weekly, @monthly, @yearly
    #[arg(long, value_name = "EXPR", conflicts_with = "every")]
    pub cron: Option<String>,
    /// The cron expression's IANA time zone [default: the system's]
    #[arg(long, value_name = "ZONE", requires = "cron")]
    pub tz: Option<String>,
    /// Fire every this many seconds (fractions allowed, at least 0.1)
    #[arg(long, value_name = "SECS", value_parser = seconds, allow_negative_numbers = true)]
    pub every: Option<Duration>,
    /// Positional arguments of the task, a JSON array
    #[arg(long, value_name = "JSON_ARRAY")]
    pub args: Option<String>,
    /// Named arguments of the task, a JSON object
    #[arg(long, value_name = "JSON_OBJECT")]
    pub kwargs: Option<String>,
    /// Ticks that passed while no foreman ran: none (skip them), one (fire once for all),
    /// all (fire each, at most 1,000) [default: one]
    #[arg(long, value_enum, value_name = "WHICH")]
    pub catch_up: Option<crate::schedules::CatchUp>,
    /// Delay each fire by a random part of this many seconds [default: 0]
    #[arg(long, value_name = "SECS", value_parser = seconds, allow_negative_numbers = true)]
    pub jitter: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// At most this many tasks run at once
    #[arg(long, env = "SNAPQ_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// At most this many tasks claimed in one transaction
    #[arg(long, env = "SNAPQ_BATCH", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Seconds to wait for running tasks after SIGTERM/SIGINT before exiting anyway
    #[arg(long, env = "SNAPQ_GRACEFUL_TIMEOUT", value_name = "SECS", default_value = "30",
          value_parser = seconds, allow_negative_numbers = true)]
    pub graceful_timeout: Duration,
    /// Run every task that is due, wait for them, and exit: 0 if every one succeeded, 3 if
    /// any failed, panicked or was rejected (the rest still ran), 1 if the queue could not
    /// be read
    #[arg(long)]
    pub burst: bool,
    /// Publish monitor results to RabbitMQ (through an outbox in the database) instead of
    /// appending them to HOME/results.jsonl, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long, env = "SNAPQ_AMQP_URL", value_name = "URL")]
    pub amqp_url: Option<String>,
    /// Publish monitor results to an MQTT broker instead, through the same outbox (QoS 1;
    /// topics mirror RabbitMQ's routing keys), e.g. mqtt://127.0.0.1:1883
    #[arg(long, env = "SNAPQ_MQTT_URL", value_name = "URL")]
    pub mqtt_url: Option<String>,
    /// Publish monitor results to the broker whose URL scheme this is (amqp://, amqps://,
    /// mqtt://; --amqp-url and --mqtt-url are the same for their schemes)
    #[arg(long, env = "SNAPQ_BROKER_URL", value_name = "URL")]
    pub broker_url: Option<String>,
    /// Seconds between heartbeats on RabbitMQ's health_check exchange (with --amqp-url)
    #[arg(long, env = "SNAPQ_HEARTBEAT_INTERVAL", value_name = "SECS", default_value = "10",
          value_parser = seconds, allow_negative_numbers = true)]
    pub heartbeat_interval: Duration,
    /// The most results the RabbitMQ outbox keeps while the broker is unreachable; past
    /// it the oldest are dropped, with a warning and a count in `snapq status`
    #[arg(long, env = "SNAPQ_OUTBOX_CAP", value_name = "ROWS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub outbox_cap: u64,
    /// Act as PANIC's node monitors manager (with --amqp-url): consume PANIC's Chainlink
    /// nodes configurations (exchange `config`, `chains.*.*.nodes_config`) and start,
    /// restart and stop a chainlink_node monitor per node as they say
    #[arg(long, env = "SNAPQ_PANIC_CONFIGS", value_parser = FalseyValueParser::new())]
    pub panic_configs: bool,
    /// The durable queue --panic-configs consumes (PANIC's own by default)
    #[arg(long, env = "SNAPQ_PANIC_CONFIGS_QUEUE", value_name = "NAME",
          default_value = crate::panic_configs::DEFAULT_QUEUE)]
    pub panic_configs_queue: String,
    /// Seconds between the rounds of each monitor started by PANIC's configurations
    #[arg(long, env = "SNAPQ_PANIC_INTERVAL", value_name = "SECS", default_value = "10",
          value_parser = seconds, allow_negative_numbers = true)]
    pub panic_interval: Duration,
    /// Record no telemetry (task durations and waits, resource use) in the telemetry
    /// directory
    #[arg(long, env = "SNAPQ_NO_TELEMETRY", value_parser = FalseyValueParser::new())]
    pub no_telemetry: bool,
    /// Serve the live view here: a web page, /api/status, /metrics and the /events
    /// WebSocket (e.g. 127.0.0.1:8080; a bare port means 127.0.0.1). Off by default; an
    /// address beyond loopback needs --http-token
    #[arg(long, env = "SNAPQ_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// Require this token on every live view request (?token=TOKEN or Authorization:
    /// Bearer TOKEN); letters, digits and - . _ ~
    #[arg(
        long,
        env = "SNAPQ_HTTP_TOKEN",
        value_name = "TOKEN",
        requires = "http"
    )]
    pub http_token: Option<String>,
    /// A host name by which the live view may be opened besides IP addresses and localhost
    /// (repeat it, or separate names with commas); other names in a request's Host header
    /// are refused with 421, against DNS rebinding
    #[arg(
        long,
        env = "SNAPQ_HTTP_ALLOW_HOST",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub http_allow_host: Vec<String>,
    /// Seconds the live view keeps a channel's history after its final message
    #[arg(long, env = "SNAPQ_HTTP_RETENTION", value_name = "SECS", default_value = "300",
          value_parser = seconds, allow_negative_numbers = true)]
    pub http_retention: Duration,
    /// The most live view connections served at once (pages, API calls, WebSockets)
    #[arg(long, env = "SNAPQ_HTTP_MAX_CONNECTIONS", value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub http_max_connections: u16,
    /// How many live view messages a WebSocket client may fall behind (the size of the
    /// feed all clients read); a client further behind is disconnected (close code 1008,
    /// "too slow")
    #[arg(long, env = "SNAPQ_HTTP_CLIENT_QUEUE", value_name = "MESSAGES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_client_queue: u32,
    /// Seconds of silence after which a live view WebSocket client is pinged; one that
    /// stays silent as long again is disconnected (browsers answer pings by themselves)
    #[arg(long, env = "SNAPQ_HTTP_PING_INTERVAL", value_name = "SECS", default_value = "30",
          value_parser = seconds, allow_negative_numbers = true)]
    pub http_ping_interval: Duration,
    /// How long task records are kept after they end: seconds, or 90s, 15m, 2h, 7d
    #[arg(long, env = "SNAPQ_HISTORY_RETENTION", value_name = "DURATION", default_value = "7d",
          value_parser = recent)]
    pub history_retention: Duration,
    /// About this many of the newest task records are kept; older ones are pruned
    #[arg(long, env = "SNAPQ_HISTORY_MAX_ROWS", value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub history_max_rows: u64,
    /// Seconds between re-reads of the queue when no wake-up comes (tests raise it to
    /// prove no wake-up is missed)
    #[arg(long, env = "SNAPQ_SAFETY_INTERVAL", value_name = "SECS", hide = true,
          default_value = "5", value_parser = seconds)]
    pub safety_interval: Duration,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The task's name (see `snapq tasks`)
    #[arg(required_unless_present = "file")]
    pub task: Option<String>,
    /// Positional arguments, a JSON array: '[1, "a"]'
    #[arg(long, value_name = "JSON_ARRAY", conflicts_with = "file")]
    pub args: Option<String>,
    /// Named arguments, a JSON object: '{"seconds": 2}'
    #[arg(long, value_name = "JSON_OBJECT", conflicts_with = "file")]
    pub kwargs: Option<String>,
    /// Run no earlier than this many seconds from now (fractions allowed)
    #[arg(long, value_name = "SECS", value_parser = seconds, allow_negative_numbers = true,
          conflicts_with_all = ["at", "file"])]
    pub delay: Option<Duration>,
    /// Run no earlier than this RFC 3339 time (2026-11-23T18:00:00Z)
    #[arg(long, value_name = "RFC3339", conflicts_with = "file")]
    pub at: Option<String>,
    /// Enqueue JSON Lines from a file (or - for stdin), all in one transaction:
    /// {"task": "append", "args": [...], "kwargs": {...}, "delay": 1.5} a line; prints the
    /// count
    #[arg(long, value_name = "PATH|-", conflicts_with = "task")]
    pub file: Option<String>,
    /// With --file: print the new tasks' ids, one a line in the input's order, instead of
    /// the count
    #[arg(long, requires = "file")]
    pub ids: bool,
}

/// `--since`: plain seconds, or a humantime duration (`15m`, `2h 30m`).
fn recent(text: &str) -> std::result::Result<Duration, String> {
    if let Ok(d) = clock::parse_seconds("--since", text) {
        return Ok(d);
    }
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write seconds (90) or e.g. 15m, 2h, 1d")
    })
}

fn seconds(text: &str) -> std::result::Result<Duration, String> {
    clock::parse_seconds("duration", text).map_err(|e| e.to_string())
}

/// Parses the command line, runs the command, maps the outcome to an exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: to stdout, exit 0.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // Usage errors in the same style as every other error: `snapq: error: …`, exit 2.
        Err(e) => {
            let _ = write!(std::io::stderr(), "snapq: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(cli.global.log_format);
    logging::log_panics();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "snapq: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

pub fn execute(cli: Cli) -> Result<()> {
    let g = &cli.global;
    let (queue, queue_db) = QueueTarget::parse(g.queue.as_deref(), &g.queue_name)?;
    if let (Some(db), Some(from_queue)) = (&g.db, &queue_db)
        && db != from_queue
    {
        return Err(Error::bad_input(
            "--queue",
            format!(
                "sqlite:{} and --db {} name two databases; give one of them",
                from_queue.display(),
                db.display()
            ),
        ));
    }
    let paths = Paths::resolve(&PathOverrides {
        home: g.home.clone(),
        db: queue_db.or_else(|| g.db.clone()),
        wakeup_dir: g.wakeup_dir.clone(),
        pid_file: g.pid_file.clone(),
        no_pid_file: g.no_pid_file,
        telemetry_dir: g.telemetry_dir.clone(),
        tasks: g.tasks.clone(),
    })?;
    if let QueueTarget::RabbitMq { url, name } = &queue {
        match &cli.command {
            Command::Enqueue(args) => return enqueue_rabbitmq(&paths, url, name, args),
            Command::Retry { id } => return retry_rabbitmq(&paths, g.synchronous, url, name, *id),
            Command::Cancel { .. } => {
                return Err(crate::backend::unsupported(
                    "rabbitmq",
                    "take a task off the queue by its id (a broker hands out messages, it \
                     does not look them up)",
                    "let it run, or make its task type do nothing",
                ));
            }
            Command::Status { json } => {
                return status_rabbitmq(&paths, g.synchronous, url, name, *json);
            }
            Command::Show { id, json } => {
                return show_task(&paths, g.synchronous, *id, *json).or_else(|e| match e {
                    Error::NotThere(message) => show_elsewhere(url, name, *id, *json, &message),
                    other => Err(other),
                });
            }
            _ => {}
        }
    }
    match cli.command {
        Command::Run(args) => run(&paths, g.synchronous, &args, queue),
        Command::Enqueue(args) => enqueue(&paths, g.synchronous, &args),
        Command::Status { json } => show_status(&paths, g.synchronous, json),
        Command::Tasks { json } => tasks(&paths, g.synchronous, json),
        Command::Stats { json, since } => show_stats(&paths, json, since),
        Command::Show { id, json } => show_task(&paths, g.synchronous, id, json),
        Command::Logs { id } => show_logs(&paths, g.synchronous, id),
        Command::History {
            states,
            task,
            since,
            limit,
            json,
        } => show_history(&paths, g.synchronous, states, task, since, limit, json),
        Command::Cancel { ids } => cancel(&paths, g.synchronous, &ids),
        Command::Retry { id } => retry(&paths, g.synchronous, id),
        Command::Monitor(command) => monitor_command(&paths, g.synchronous, command),
        Command::Schedule(command) => schedule_command(&paths, g.synchronous, command),
    }
}

fn run(paths: &Paths, synchronous: Synchronous, args: &RunArgs, queue: QueueTarget) -> Result<()> {
    let config = ForemanConfig {
        queue,
        telemetry_dir: (!args.no_telemetry).then(|| paths.telemetry_dir.clone()),
        synchronous,
        workers: usize::from(args.workers),
        batch: args.batch as usize,
        graceful_timeout: args.graceful_timeout,
        burst: args.burst,
        safety_interval: args.safety_interval.max(Duration::from_millis(10)),
        history_retention: args.history_retention,
        history_max_rows: args.history_max_rows,
        live: live_config(paths, args)?,
        tasks_file: Some(paths.tasks_file.clone()),
        ..ForemanConfig::from_paths(paths)
    };
    let Some((kind, url)) = broker(args)? else {
        if args.panic_configs {
            return Err(Error::bad_input(
                "--panic-configs",
                "PANIC's configurations come over RabbitMQ: give --amqp-url too",
            ));
        }
        if paths.db.exists() {
            let conn = db::open(&paths.db, synchronous)?;
            crate::outbox::clear_state(&conn)?;
            crate::panic_configs::clear_state(&conn)?;
        }
        return foreman::run(&config, Registry::with_builtins()).and_then(burst_outcome);
    };
    // The publisher outlives the foreman loop: it is dropped (and stopped) after it.
    if args.heartbeat_interval < Duration::from_millis(100) {
        return Err(Error::bad_input(
            "--heartbeat-interval",
            "give at least 0.1 seconds",
        ));
    }
    if args.panic_configs && args.panic_interval < crate::monitor::store::MIN_INTERVAL {
        return Err(Error::bad_input(
            "--panic-interval",
            "give at least 0.1 seconds",
        ));
    }
    if args.panic_configs && kind.name() != "amqp" {
        return Err(Error::bad_input(
            "--panic-configs",
            format!(
                "PANIC's configurations come over RabbitMQ, not {}: give --amqp-url",
                kind.title()
            ),
        ));
    }
    let (sink, _publisher) = crate::outbox::start(
        kind,
        &url,
        paths.db.clone(),
        args.heartbeat_interval,
        args.outbox_cap,
    )?;
    // Like the publisher, the consumer is stopped after the foreman loop.
    let _configs = if args.panic_configs && !args.burst {
        Some(crate::panic_configs::start(
            crate::panic_configs::Settings {
                url,
                queue: args.panic_configs_queue.clone(),
                interval: args.panic_interval,
                manager_name: "snapq".into(),
                db: paths.db.clone(),
                wakeup_dir: paths.wakeup_dir.clone(),
                synchronous,
            },
        )?)
    } else {
        crate::panic_configs::clear_state(&db::open(&paths.db, synchronous)?)?;
        None
    };
    foreman::run_with_sink(&config, Registry::with_builtins(), Box::new(sink))
        .and_then(burst_outcome)
}

/// The broker results go to, if any: its kind (by the URL's scheme) and URL. One of
/// --amqp-url, --mqtt-url and --broker-url at most; the first two only take their schemes.
fn broker(args: &RunArgs) -> Result<Option<(&'static dyn crate::brokers::BrokerKind, String)>> {
    let given: Vec<(&str, &String, Option<&str>)> = [
        ("--amqp-url", &args.amqp_url, Some("amqp")),
        ("--mqtt-url", &args.mqtt_url, Some("mqtt")),
        ("--broker-url", &args.broker_url, None),
    ]
    .into_iter()
    .filter_map(|(flag, url, only)| url.as_ref().map(|u| (flag, u, only)))
    .collect();
    let [(flag, url, only)] = given.as_slice() else {
        if given.is_empty() {
            return Ok(None);
        }
        let flags: Vec<&str> = given.iter().map(|(f, ..)| *f).collect();
        return Err(Error::bad_input(
            "broker",
            format!(
                "{} were all given: results go to one broker; keep one",
                flags.join(" and ")
            ),
        ));
    };
    let found = crate::brokers::for_url(flag, url);
    if let Some(only) = only
        && let Some(wanted) = crate::brokers::by_name(only)
        && found.as_ref().map_or(true, |k| k.name() != *only)
    {
        let elsewhere = found
            .map(|k| format!(" (a {} URL goes to --broker-url)", k.title()))
            .unwrap_or_default();
        return Err(Error::bad_input(
            *flag,
            format!(
                "{url:?} is not an {only}:// URL; write e.g. {}{elsewhere}",
                wanted.example()
            ),
        ));
    }
    Ok(Some((found?, (*url).clone())))
}

/// SPEC: a `--burst` run exits 3 when any task it ran did not succeed, so that a cron job
/// sees it. (A foreman stopped by a signal exits 0: its tasks' outcomes are in the log.)
fn burst_outcome((stopped, totals): (foreman::Stopped, foreman::Totals)) -> Result<()> {
    if stopped == foreman::Stopped::Drained && totals.failed > 0 {
        return Err(Error::TasksFailed {
            failed: totals.failed,
            ran: totals.failed + totals.succeeded,
        });
    }
    Ok(())
}

/// The live view's settings, checked before anything is opened (bad input changes nothing).
fn live_config(paths: &Paths, args: &RunArgs) -> Result<Option<LiveConfig>> {
    let Some(addr) = &args.http else {
        return Ok(None);
    };
    let addr = if addr.parse::<u16>().is_ok() {
        format!("127.0.0.1:{addr}")
    } else {
        addr.clone()
    };
    let config = LiveConfig {
        addr,
        token: args.http_token.clone(),
        allow_hosts: args.http_allow_host.clone(),
        limits: Limits {
            retention: args.http_retention,
            max_connections: usize::from(args.http_max_connections),
            client_queue: args.http_client_queue as usize,
            ping_interval: args.http_ping_interval,
            ..Limits::default()
        },
        db: paths.db.clone(),
        workers: usize::from(args.workers),
    };
    config.validate()?;
    Ok(Some(config))
}

fn enqueue(paths: &Paths, synchronous: Synchronous, args: &EnqueueArgs) -> Result<()> {
    if let Some(file) = &args.file {
        let registry = paths.tasks_file.with_commands(&Registry::with_builtins())?;
        let open = || Enqueuer::with_registry(&paths.db, &paths.wakeup_dir, synchronous, &registry);
        let (count, q) = if file == "-" {
            let mut q = open()?;
            (q.enqueue_lines(std::io::stdin().lock(), "stdin")?, q)
        } else {
            let handle = std::fs::File::open(file).map_err(|e| Error::BadPath {
                role: "input file",
                path: file.into(),
                problem: format!("cannot be read ({e})"),
            })?;
            let mut q = open()?;
            (q.enqueue_lines(BufReader::new(handle), file)?, q)
        };
        if !args.ids {
            return print(&format!("{count}\n"));
        }
        let mut out = String::new();
        for id in q.stored_ids().into_iter().flatten() {
            out.push_str(&format!("{id}\n"));
        }
        return print(&out);
    }
    // Everything that can be checked without the database is checked first.
    let task = one_task(args)?;
    let registry = paths.tasks_file.with_commands(&Registry::with_builtins())?;
    let mut q = Enqueuer::with_registry(&paths.db, &paths.wakeup_dir, synchronous, &registry)?;
    let id = q.enqueue(&task)?;
    print(&format!("{id}\n"))
}

/// The one task `enqueue TASK [--args] [--kwargs] [--delay | --at]` gives.
fn one_task(args: &EnqueueArgs) -> Result<NewTask> {
    let name = args
        .task
        .as_deref()
        .ok_or_else(|| Error::bad_input("usage", "give a TASK name or --file"))?;
    let task_args = match &args.args {
        Some(text) => queue::parse_json_arg("--args", text)?,
        None => serde_json::Value::Array(Vec::new()),
    };
    let kwargs = match &args.kwargs {
        Some(text) => queue::parse_json_arg("--kwargs", text)?,
        None => serde_json::Value::Object(Default::default()),
    };
    let when = match (&args.delay, &args.at) {
        (Some(delay), _) => When::After(*delay),
        (None, Some(at)) => When::At(clock::parse_rfc3339_micros("--at", at)?),
        (None, None) => When::Now,
    };
    Ok(NewTask {
        task: name.to_owned(),
        args: task_args,
        kwargs,
        when,
    })
}

/// The tasks `enqueue` was given (one, or JSON Lines), checked against the built-in tasks,
/// the tasks file's and those recorded in the home's database (if there is one).
fn tasks_to_enqueue(paths: &Paths, args: &EnqueueArgs) -> Result<Vec<NewTask>> {
    let registry = paths.tasks_file.with_commands(&Registry::with_builtins())?;
    let mut catalog = Catalog::from_registry(&registry);
    if paths.db.exists() {
        catalog.add_recorded(&db::open(&paths.db, Synchronous::Normal)?)?;
    }
    let mut tasks = Vec::new();
    if let Some(file) = &args.file {
        let mut keep = |task, _: &dyn Fn(Error) -> Error| {
            tasks.push(task);
            Ok(())
        };
        if file == "-" {
            queue::read_lines(std::io::stdin().lock(), "stdin", &catalog, &mut keep)?;
        } else {
            let handle = std::fs::File::open(file).map_err(|e| Error::BadPath {
                role: "input file",
                path: file.into(),
                problem: format!("cannot be read ({e})"),
            })?;
            queue::read_lines(BufReader::new(handle), file, &catalog, &mut keep)?;
        }
        return Ok(tasks);
    }
    let task = one_task(args)?;
    catalog.check(&task)?;
    Ok(vec![task])
}

/// `enqueue --queue amqp://…`: published, confirmed, then the ids (or the count) printed.
fn enqueue_rabbitmq(paths: &Paths, url: &str, name: &str, args: &EnqueueArgs) -> Result<()> {
    use crate::backend::QueueBackend;
    let tasks = tasks_to_enqueue(paths, args)?;
    let ids = crate::backend::RabbitQueue::producer(url, name)?.enqueue(&tasks)?;
    if args.file.is_some() && !args.ids {
        return print(&format!("{}\n", ids.len()));
    }
    print(&ids.iter().map(|id| format!("{id}\n")).collect::<String>())
}

/// `status --queue amqp://…`: this machine's foreman and records, and the broker's counts
/// ("at least": the broker does not count what its consumers hold).
fn status_rabbitmq(
    paths: &Paths,
    synchronous: Synchronous,
    url: &str,
    name: &str,
    json: bool,
) -> Result<()> {
    use crate::backend::QueueBackend;
    let mut status = if paths.db.exists() {
        status::read(&db::open(&paths.db, synchronous)?, &paths.db)?
    } else {
        status::empty(&paths.db)
    };
    let counts = crate::backend::RabbitQueue::producer(url, name)?.counts(clock::now_micros())?;
    status.tasks.due = counts.due;
    status.tasks.delayed = counts.delayed;
    status.tasks.oldest_due_age_seconds = None;
    status.tasks.next_delayed_in_seconds = None;
    status.queue = Some(status::QueueStatus {
        backend: "rabbitmq",
        name: name.to_owned(),
        url: crate::rabbitmq::redact(url),
        counts_are_at_least: true,
    });
    if json {
        print_json(&status)
    } else {
        print(&status.render())
    }
}

fn show_status(paths: &Paths, synchronous: Synchronous, json: bool) -> Result<()> {
    let status = if paths.db.exists() {
        let conn = db::open(&paths.db, synchronous)?;
        status::read(&conn, &paths.db)?
    } else {
        status::empty(&paths.db)
    };
    if json {
        print_json(&status)
    } else {
        print(&status.render())
    }
}

fn schedule_command(
    paths: &Paths,
    synchronous: Synchronous,
    command: ScheduleCommand,
) -> Result<()> {
    use crate::schedules::{self, Cadence, NewSchedule, Shown};
    let writer = || -> Result<(rusqlite::Connection, WakeDir)> {
        let wake = WakeDir::prepare(&paths.wakeup_dir)?;
        Ok((db::open(&paths.db, synchronous)?, wake))
    };
    // Checks the task and its arguments as `enqueue` does: nothing is stored otherwise.
    let checked = |conn: &rusqlite::Connection, s: &NewSchedule| -> Result<()> {
        let registry = paths.tasks_file.with_commands(&Registry::with_builtins())?;
        let mut catalog = Catalog::from_registry(&registry);
        catalog.add_recorded(conn)?;
        catalog.check(&NewTask {
            task: s.task.clone(),
            args: s.args.clone(),
            kwargs: s.kwargs.clone(),
            when: When::Now,
        })
    };
    let json_arg = |flag: &str, text: &Option<String>, empty: serde_json::Value| {
        text.as_deref()
            .map_or(Ok(empty), |t| queue::parse_json_arg(flag, t))
    };
    let when_of = |spec: &ScheduleSpec| -> Result<Option<Cadence>> {
        match (&spec.cron, spec.every) {
            (Some(expr), _) => Ok(Some(Cadence::cron(expr, spec.tz.as_deref())?)),
            (None, Some(every)) => Ok(Some(Cadence::every(every)?)),
            (None, None) => Ok(None),
        }
    };
    match command {
        ScheduleCommand::Add { name, task, spec } => {
            schedules::check_name(&name)?;
            let when = when_of(&spec)?
                .ok_or_else(|| Error::bad_input("usage", "give --cron EXPR or --every SECS"))?;
            let new = NewSchedule {
                name,
                when,
                task,
                args: json_arg("--args", &spec.args, serde_json::json!([]))?,
                kwargs: json_arg("--kwargs", &spec.kwargs, serde_json::json!({}))?,
                catch_up: spec.catch_up.unwrap_or(schedules::CatchUp::One),
                jitter: spec.jitter.unwrap_or_default(),
            };
            let (conn, wake) = writer()?;
            checked(&conn, &new)?;
            let next = schedules::add(&conn, &new)?;
            wake.wake_after_commit("the schedule is");
            print(&format!(
                "added schedule {:?}: {} enqueues {}; next tick {}\n",
                new.name,
                new.when.describe(),
                new.task,
                clock::format_micros(next)
            ))
        }
        ScheduleCommand::Update { name, task, spec } => {
            let when = when_of(&spec)?;
            let (conn, wake) = writer()?;
            let old = schedules::get(&conn, &name)?.ok_or_else(|| {
                Error::NotThere(format!(
                    "no schedule named {name:?}; `snapq schedule list` lists them"
                ))
            })?;
            let parse = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
            let new = NewSchedule {
                name,
                when: when.unwrap_or(old.when),
                task: task.unwrap_or(old.task),
                args: json_arg("--args", &spec.args, parse(&old.args))?,
                kwargs: json_arg("--kwargs", &spec.kwargs, parse(&old.kwargs))?,
                catch_up: spec.catch_up.unwrap_or(old.catch_up),
                jitter: spec.jitter.unwrap_or(old.jitter),
            };
            checked(&conn, &new)?;
            let next = schedules::update(&conn, &new)?;
            wake.wake_after_commit("the update is");
            print(&format!(
                "updated schedule {:?}; next tick {}\n",
                new.name,
                clock::format_micros(next)
            ))
        }
        ScheduleCommand::Remove { name } => {
            let (conn, wake) = writer()?;
            schedules::remove(&conn, &name)?;
            wake.wake_after_commit("the removal is");
            print(&format!("removed schedule {name:?}\n"))
        }
        ScheduleCommand::Pause { name } => {
            let (conn, wake) = writer()?;
            schedules::set_paused(&conn, &name, true)?;
            wake.wake_after_commit("the pause is");
            print(&format!("paused schedule {name:?}\n"))
        }
        ScheduleCommand::Resume { name } => {
            let (conn, wake) = writer()?;
            schedules::set_paused(&conn, &name, false)?;
            wake.wake_after_commit("the resumption is");
            print(&format!("resumed schedule {name:?}\n"))
        }
        ScheduleCommand::List { json } => {
            let conn = if paths.db.exists() {
                Some(db::open(&paths.db, synchronous)?)
            } else {
                None
            };
            let mut shown = Vec::new();
            if let Some(conn) = &conn {
                for s in schedules::list(conn)? {
                    shown.push(Shown::of(conn, &s, 0)?);
                }
            }
            if json {
                return print_json(&shown);
            }
            if shown.is_empty() {
                return print("no schedules (add one with `snapq schedule add`)\n");
            }
            let mut out = String::new();
            for s in &shown {
                out.push_str(&format!(
                    "{}  {}  {}  next {}  last {}{}\n",
                    s.name,
                    s.when,
                    s.task,
                    s.next_fire_at.as_deref().unwrap_or("(paused)"),
                    s.last_fire_at.as_deref().unwrap_or("never"),
                    match (&s.last_task_id, &s.last_task_state) {
                        (Some(id), Some(state)) => format!(" (task {id}: {state})"),
                        (Some(id), None) => format!(" (task {id})"),
                        _ => String::new(),
                    }
                ));
            }
            print(&out)
        }
        ScheduleCommand::Show { name } => {
            let missing = || {
                Error::NotThere(format!(
                    "no schedule named {name:?}; `snapq schedule list` lists them"
                ))
            };
            if !paths.db.exists() {
                return Err(missing());
            }
            let conn = db::open(&paths.db, synchronous)?;
            let s = schedules::get(&conn, &name)?.ok_or_else(missing)?;
            print_json(&Shown::of(&conn, &s, 5)?)
        }
    }
}

fn monitor_command(paths: &Paths, synchronous: Synchronous, command: MonitorCommand) -> Result<()> {
    use crate::monitor::store;
    let parse_config = |text: &str| queue::parse_json_arg("--config", text);
    // Writers wake the foreman so the change takes effect within a second.
    let writer = || -> Result<(rusqlite::Connection, WakeDir)> {
        let wake = WakeDir::prepare(&paths.wakeup_dir)?;
        Ok((db::open(&paths.db, synchronous)?, wake))
    };
    match command {
        MonitorCommand::Add {
            kind,
            name,
            config,
            interval,
        } => {
            let config = parse_config(&config)?;
            // Checked before the database is opened: bad input changes nothing.
            store::check_new(&kind, &name, &config, interval)?;
            let (conn, wake) = writer()?;
            store::add(&conn, &kind, &name, &config, interval)?;
            wake.wake_after_commit("the monitor is");
            print(&format!("added {kind} monitor {name:?}\n"))
        }
        MonitorCommand::Update {
            name,
            config,
            interval,
        } => {
            if config.is_none() && interval.is_none() {
                return Err(Error::bad_input(
                    "usage",
                    "give --config, --interval or both",
                ));
            }
            let config = config.as_deref().map(parse_config).transpose()?;
            let (mut conn, wake) = writer()?;
            let version = store::update(&mut conn, &name, config.as_ref(), interval)?;
            wake.wake_after_commit("the update is");
            print(&format!("updated monitor {name:?} to version {version}\n"))
        }
        MonitorCommand::Remove { name } => {
            let (mut conn, wake) = writer()?;
            store::remove(&mut conn, &name)?;
            wake.wake_after_commit("the removal is");
            print(&format!("removed monitor {name:?}\n"))
        }
        MonitorCommand::List { json } => {
            let monitors = if paths.db.exists() {
                store::list(&db::open(&paths.db, synchronous)?)?
            } else {
                Vec::new()
            };
            if json {
                return print_json(&monitors);
            }
            if monitors.is_empty() {
                return print(
                    "no monitors (add one with `snapq monitor add KIND NAME --config JSON`)\n",
                );
            }
            let mut out = String::new();
            for m in &monitors {
                let status = m.last_status.as_deref().unwrap_or("pending");
                let mut detail = match (&m.last_error, &m.last_summary) {
                    (Some(e), _) if status == "error" => e.clone(),
                    (_, Some(s)) => s.clone(),
                    _ => String::new(),
                };
                if let Some(owner) = &m.managed_by {
                    let chain = owner.strip_prefix("panic:").unwrap_or(owner);
                    detail = format!("[managed by PANIC configs, chain {chain}] {detail}");
                }
                out.push_str(&format!(
                    "{:20} {:15} every {:>6.1} s  {:7}  last run {}  {}\n",
                    m.name,
                    m.kind,
                    m.interval_seconds,
                    status,
                    m.last_run_at.as_deref().unwrap_or("never"),
                    detail
                ));
            }
            print(&out)
        }
        MonitorCommand::Show { name } => {
            if !paths.db.exists() {
                return Err(Error::bad_input(
                    "monitor name",
                    format!("there is no monitor named {name:?}"),
                ));
            }
            print_json(&store::show(&db::open(&paths.db, synchronous)?, &name)?)
        }
    }
}

fn no_task(id: i64) -> Error {
    Error::NotThere(format!(
        "{}; is --home the foreman's? `snapq history` lists the recorded ones",
        crate::records::not_found_message(id)
    ))
}

fn show_task(paths: &Paths, synchronous: Synchronous, id: i64, json: bool) -> Result<()> {
    if !paths.db.exists() {
        return Err(no_task(id));
    }
    let conn = db::open(&paths.db, synchronous)?;
    let record = crate::records::show(&conn, id)?.ok_or_else(|| no_task(id))?;
    print_record(&record, json)
}

/// `show`'s output: the record as JSON, or as lines for a person.
fn print_record(record: &crate::records::Record, json: bool) -> Result<()> {
    if json {
        return print_json(record);
    }
    let r = record;
    let mut out = format!(
        "task {} ({}): {}, attempt {}\n",
        r.id, r.task, r.state, r.attempt
    );
    let at = |t: &Option<String>| t.clone().unwrap_or_else(|| "–".into());
    match &r.recorded_on {
        Some(host) => out.push_str(&format!(
            "  ran on {host} (its `snapq show` has the arguments and the output)\n"
        )),
        None => {
            out.push_str(&format!("  args {}  kwargs {}\n", r.args, r.kwargs));
            out.push_str(&format!(
                "  enqueued {}, due {}\n",
                at(&r.enqueued_at),
                at(&r.due_at)
            ));
        }
    }
    if r.started_at.is_some() {
        out.push_str(&format!("  started {}", at(&r.started_at)));
        if let Some(pid) = r.foreman_pid.filter(|_| r.state == "running") {
            out.push_str(&format!(" by the foreman with pid {pid}"));
        }
        out.push('\n');
    }
    if r.finished_at.is_some() {
        out.push_str(&format!("  ended {}", at(&r.finished_at)));
        if let Some(d) = r.duration_seconds {
            out.push_str(&format!(" after {d:.3} s"));
        }
        out.push('\n');
    }
    if let Some(error) = &r.error {
        out.push_str(&format!("  error: {error}\n"));
    }
    match (r.exit_code, &r.signal) {
        (Some(code), _) => out.push_str(&format!("  exit code {code}\n")),
        (None, Some(signal)) => out.push_str(&format!("  ended by SIG{signal}\n")),
        (None, None) => {}
    }
    if let Some(output) = r.output.as_deref().filter(|o| !o.is_empty()) {
        out.push_str(if r.output_truncated {
            "  output (its last part; `snapq logs` prints it alone):\n"
        } else {
            "  output (`snapq logs` prints it alone):\n"
        });
        for line in output.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    print(&out)
}

fn show_logs(paths: &Paths, synchronous: Synchronous, id: i64) -> Result<()> {
    if !paths.db.exists() {
        return Err(no_task(id));
    }
    let conn = db::open(&paths.db, synchronous)?;
    let output = crate::records::output(&conn, id)?.ok_or_else(|| no_task(id))?;
    let mut out = std::io::stdout().lock();
    match out.write_all(&output).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io {
            context: "writing to",
            path: "stdout".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn show_history(
    paths: &Paths,
    synchronous: Synchronous,
    states: Vec<String>,
    task: Option<String>,
    since: Option<Duration>,
    limit: usize,
    json: bool,
) -> Result<()> {
    for state in &states {
        // `queued`: a record waits for its next attempt (a retry); tasks queued for their
        // first run have no record yet.
        if !crate::records::STATES.contains(&state.as_str()) {
            return Err(Error::bad_input(
                "--state",
                format!(
                    "{state:?} is not a state a record has; give one of {}",
                    crate::records::STATES.join(", ")
                ),
            ));
        }
    }
    let records = if paths.db.exists() {
        let filter = crate::records::Filter {
            states,
            task,
            since: since.map(|d| clock::now_micros() - clock::micros_of(d)),
            limit,
        };
        crate::records::history(&db::open(&paths.db, synchronous)?, &filter)?
    } else {
        Vec::new()
    };
    if json {
        return print_json(&records);
    }
    if records.is_empty() {
        return print("no task records match\n");
    }
    let mut out = String::new();
    for r in &records {
        let error: String = r.error.as_deref().unwrap_or("").chars().take(60).collect();
        out.push_str(&format!(
            "{:>8}  {:16}  {:10}  {:27}  {:>9}  {}\n",
            r.id,
            r.task,
            r.state,
            r.finished_at.as_deref().unwrap_or("–"),
            r.duration_seconds
                .map_or_else(|| "–".into(), |d| format!("{d:.3} s")),
            error
        ));
    }
    print(&out)
}

fn cancel(paths: &Paths, synchronous: Synchronous, ids: &[i64]) -> Result<()> {
    if !paths.db.exists() {
        return Err(no_task(ids[0]));
    }
    let conn = db::open(&paths.db, synchronous)?;
    let mut refused = Vec::new();
    let mut out = String::new();
    for &id in ids {
        match crate::records::cancel(&conn, id)? {
            crate::records::Cancelled::Done => out.push_str(&format!("cancelled task {id}\n")),
            crate::records::Cancelled::Running => refused.push(format!(
                "task {id} is running: it cannot be taken back (each task runs at most once)"
            )),
            crate::records::Cancelled::Ended(state) => {
                refused.push(format!("task {id} already ended: {state}"))
            }
            crate::records::Cancelled::Unknown => refused.push(no_task(id).to_string()),
        }
    }
    print(&out)?;
    if refused.is_empty() {
        Ok(())
    } else {
        Err(Error::NotThere(refused.join("; ")))
    }
}

fn retry(paths: &Paths, synchronous: Synchronous, id: i64) -> Result<()> {
    if !paths.db.exists() {
        return Err(no_task(id));
    }
    let wake = WakeDir::prepare(&paths.wakeup_dir)?;
    let conn = db::open(&paths.db, synchronous)?;
    let done = crate::records::retry(&conn, id)?;
    if matches!(done, crate::records::Retried::Queued { .. }) {
        wake.wake_after_commit("the task is");
    }
    retried(id, done)
}

/// `show --queue amqp://…` of a task this machine did not run: the outcome its foreman
/// published on the queue's events stream.
fn show_elsewhere(url: &str, name: &str, id: i64, json: bool, message: &str) -> Result<()> {
    let mut queue = crate::backend::RabbitQueue::producer(url, name)?;
    match queue.recorded_elsewhere(id)? {
        Some(record) => print_record(&record, json),
        None => Err(Error::NotThere(format!(
            "{message}; and no foreman of the RabbitMQ queue {name} published an end of it \
             on {name}.events in the last 7 days: it may wait in the queue or be running \
             (the broker keeps no per-task state), or it ended earlier"
        ))),
    }
}

/// `retry --queue amqp://…`: a task this machine's foreman ran, published again.
fn retry_rabbitmq(
    paths: &Paths,
    synchronous: Synchronous,
    url: &str,
    name: &str,
    id: i64,
) -> Result<()> {
    let elsewhere = |e: Error| match e {
        Error::NotThere(message) => Error::NotThere(format!(
            "{message}; with the queue on RabbitMQ each machine knows only the tasks its \
             foreman ran: retry it on the machine whose `snapq show` knows it"
        )),
        other => other,
    };
    if !paths.db.exists() {
        return Err(elsewhere(no_task(id)));
    }
    let conn = db::open(&paths.db, synchronous)?;
    // Connected (and the queue declared) before the retry's transaction takes the write
    // lock: inside it only the publish and its confirm wait.
    let mut queue = crate::backend::RabbitQueue::producer(url, name)?;
    retried(id, queue.retry(&conn, id)?).map_err(elsewhere)
}

/// What `retry` says of what it did.
fn retried(id: i64, retried: crate::records::Retried) -> Result<()> {
    use crate::records::{RETRYABLE, Retried};
    match retried {
        Retried::Queued { attempt } => {
            print(&format!("task {id} queued again (attempt {attempt})\n"))
        }
        Retried::Refused(state) => Err(Error::NotThere(format!(
            "task {id} is {state}: only a task that ended {} can be retried",
            RETRYABLE.join(", ")
        ))),
        Retried::Unknown => Err(no_task(id)),
    }
}

fn show_stats(paths: &Paths, json: bool, since: Option<Duration>) -> Result<()> {
    let stats = stats::read(&paths.telemetry_dir, since)?;
    if json {
        print_json(&stats)
    } else {
        print(&stats.render())
    }
}

fn tasks(paths: &Paths, synchronous: Synchronous, json: bool) -> Result<()> {
    let registry = paths.tasks_file.with_commands(&Registry::with_builtins())?;
    let mut catalog = Catalog::from_registry(&registry);
    if paths.db.exists() {
        let conn = db::open(&paths.db, synchronous)?;
        catalog.add_recorded(&conn)?;
    }
    if json {
        // Command tasks carry their command as the file writes it.
        let mut specs = Vec::new();
        for spec in catalog.specs() {
            let mut value = serde_json::to_value(spec)
                .map_err(|e| Error::Runtime(format!("serialising the output: {e}")))?;
            if let (Some(command), Some(object)) =
                (registry.command(&spec.name), value.as_object_mut())
            {
                object.insert("command".into(), command.command_text.clone().into());
            }
            specs.push(value);
        }
        return print_json(&specs);
    }
    let width = catalog.specs().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    // One line a task (SPEC); a command task's line ends with its command.
    for spec in catalog.specs() {
        let command = registry
            .command(&spec.name)
            .map(|c| {
                format!(
                    "  (runs {})",
                    serde_json::Value::from(c.command_text.clone())
                )
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:width$}  {}  {}{command}\n",
            spec.name,
            spec.signature(),
            spec.summary
        ));
    }
    print(&out)
}

/// Prints one pretty JSON document.
fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let doc = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Runtime(format!("serialising the output: {e}")))?;
    print(&format!("{doc}\n"))
}

/// Writes to stdout; a closed stdout (a pipe into `head`) is not an error.
fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io {
            context: "writing to",
            path: "stdout".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Whether stderr is a terminal (colour in logs).
pub(crate) fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
