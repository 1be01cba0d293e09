//! The `monitors` table: what `snapq monitor …` writes and the foreman reads.
//!
//! Who writes what: the CLI (or a program through this module) inserts, updates and
//! deletes rows; the foreman moves `next_due` when it starts a round and writes `state` and
//! the `last_*` columns when a round of the current `version` ends.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::Value;

use super::{RoundResult, kind, kind_names};
use crate::clock::{format_micros, micros_of, now_micros};
use crate::error::{Error, Result};

/// The shortest interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// One monitor as `list` and `show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorInfo {
    pub name: String,
    pub kind: String,
    pub config: Value,
    pub interval_seconds: f64,
    pub version: i64,
    pub enabled: bool,
    pub next_due: String,
    /// "ok", "error", or null before the first round.
    pub last_status: Option<String>,
    pub last_summary: Option<String>,
    pub last_error: Option<String>,
    pub last_run_at: Option<String>,
    pub last_duration_ms: Option<f64>,
    /// Who owns the monitor when it is not the CLI: `panic:<chain>` for one started by
    /// PANIC's configurations (src/panic_configs.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

fn bad_config(kind: &str, message: String) -> Error {
    Error::BadInput {
        what: format!("{kind} config"),
        message,
    }
}

fn check_interval(interval: Duration) -> Result<i64> {
    if interval < MIN_INTERVAL {
        return Err(Error::bad_input(
            "--interval",
            format!(
                "{} s is too short; give at least {} s",
                interval.as_secs_f64(),
                MIN_INTERVAL.as_secs_f64()
            ),
        ));
    }
    Ok(micros_of(interval))
}

/// Checks everything about a new monitor that needs no database: kind, name, config,
/// interval. Returns the interval in µs.
pub fn check_new(kind_name: &str, name: &str, config: &Value, interval: Duration) -> Result<i64> {
    let kind = kind(kind_name).ok_or_else(|| {
        Error::bad_input(
            "monitor kind",
            format!(
                "{kind_name:?} is not a kind; the kinds are: {}",
                kind_names()
            ),
        )
    })?;
    check_name(name)?;
    kind.prepare(config).map_err(|m| bad_config(kind_name, m))?;
    check_interval(interval)
}

/// Validates and stores a new monitor, due now. Its version follows the last one of a
/// removed monitor of the same name, if any: it is a new monitor, never mistaken for that
/// one.
pub fn add(
    conn: &Connection,
    kind_name: &str,
    name: &str,
    config: &Value,
    interval: Duration,
) -> Result<()> {
    let interval_us = check_new(kind_name, name, config, interval)?;
    let now = now_micros();
    let inserted = conn
        .execute(
            "INSERT INTO monitors (name, kind, config, interval_us, next_due, created_at, updated_at, \
             version) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5, \
             1 + coalesce((SELECT version FROM monitor_retired WHERE name = ?1), 0)) \
             ON CONFLICT (name) DO NOTHING",
            params![name, kind_name, config.to_string(), interval_us, now],
        )
        .map_err(Error::sqlite("adding the monitor"))?;
    if inserted == 0 {
        return Err(Error::bad_input(
            "monitor name",
            format!("a monitor named {name:?} exists already; use `snapq monitor update {name}`"),
        ));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if crate::config::is_plain_name(name) {
        Ok(())
    } else {
        Err(Error::bad_input(
            "monitor name",
            format!("{name:?}: use letters, digits, '_', '-' and '.' (it goes into routing keys)"),
        ))
    }
}

/// Changes a monitor's config and/or interval; bumps its version and makes it due now, so
/// the next round uses the new config. Returns the new version.
pub fn update(
    conn: &mut Connection,
    name: &str,
    config: Option<&Value>,
    interval: Option<Duration>,
) -> Result<i64> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(Error::sqlite("starting the update"))?;
    let (kind_name, managed_by): (String, Option<String>) = tx
        .query_row(
            "SELECT kind, managed_by FROM monitors WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(Error::sqlite("reading the monitor"))?
        .ok_or_else(|| unknown(name))?;
    refuse_managed(name, managed_by.as_deref())?;
    if let Some(config) = config {
        let kind = kind(&kind_name).ok_or_else(|| {
            Error::Runtime(format!(
                "monitor {name:?} has kind {kind_name:?}, which this snapq does not know"
            ))
        })?;
        kind.prepare(config)
            .map_err(|m| bad_config(&kind_name, m))?;
    }
    let interval_us = interval.map(check_interval).transpose()?;
    let now = now_micros();
    let version: i64 = tx
        .query_row(
            "UPDATE monitors SET config = coalesce(?2, config), interval_us = coalesce(?3, interval_us), \
             version = version + 1, next_due = ?4, updated_at = ?4 WHERE name = ?1 RETURNING version",
            params![name, config.map(Value::to_string), interval_us, now],
            |r| r.get(0),
        )
        .map_err(Error::sqlite("updating the monitor"))?;
    tx.commit()
        .map_err(Error::sqlite("committing the update"))?;
    Ok(version)
}

fn unknown(name: &str) -> Error {
    Error::bad_input(
        "monitor name",
        format!("there is no monitor named {name:?} (see `snapq monitor list`)"),
    )
}

/// Deletes a monitor, remembering its version for a monitor added later under the same
/// name; a round still running has its result discarded.
pub fn remove(conn: &mut Connection, name: &str) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(Error::sqlite("starting to remove the monitor"))?;
    let managed_by: Option<Option<String>> = tx
        .query_row(
            "SELECT managed_by FROM monitors WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::sqlite("reading the monitor"))?;
    refuse_managed(name, managed_by.flatten().as_deref())?;
    retire(&tx, name)?;
    tx.commit().map_err(Error::sqlite("committing the removal"))
}

/// The CLI does not change what another owner keeps in step with its own source.
fn refuse_managed(name: &str, managed_by: Option<&str>) -> Result<()> {
    match managed_by {
        None => Ok(()),
        Some(owner) => {
            let chain = owner.strip_prefix("panic:").unwrap_or(owner);
            Err(Error::bad_input(
                "monitor name",
                format!(
                    "monitor {name:?} is managed by PANIC's configurations (chain {chain}): \
                     snapq starts, restarts and stops it as that chain's nodes_config messages \
                     say; change the node in PANIC's configuration instead"
                ),
            ))
        }
    }
}

/// Deletes a monitor inside `tx`, remembering its version.
fn retire(tx: &Transaction<'_>, name: &str) -> Result<()> {
    let retired = tx
        .execute(
            "INSERT INTO monitor_retired (name, version) \
             SELECT name, version FROM monitors WHERE name = ?1 \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version",
            [name],
        )
        .map_err(Error::sqlite("removing the monitor"))?;
    if retired == 0 {
        return Err(unknown(name));
    }
    tx.execute("DELETE FROM monitors WHERE name = ?1", [name])
        .map_err(Error::sqlite("removing the monitor"))?;
    Ok(())
}

/// One monitor an owner wants: name, kind, config, interval in µs.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub name: String,
    pub kind: String,
    pub config: Value,
    pub interval_us: i64,
}

/// What `apply_owned` changed, by monitor name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
}

/// Makes the monitors `owner` manages exactly `wanted`, inside `tx`: a new one is added
/// (due now), a changed one updated (a new version, due now: its next round uses the new
/// config), one no longer wanted removed. Each `wanted` must have passed `check_new`. A
/// name taken by a monitor of another owner (or of the CLI) is refused and nothing of the
/// rest is kept, as the caller rolls back.
pub fn apply_owned(tx: &Transaction<'_>, owner: &str, wanted: &[Wanted]) -> Result<Applied> {
    let mut applied = Applied::default();
    let now = now_micros();
    let current: Vec<(String, String, i64)> = {
        let mut stmt = tx
            .prepare("SELECT name, config, interval_us FROM monitors WHERE managed_by = ?1")
            .map_err(Error::sqlite("reading the managed monitors"))?;
        let rows = stmt
            .query_map([owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(Error::sqlite("reading the managed monitors"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(Error::sqlite("reading the managed monitors"))?
    };
    for (name, _, _) in &current {
        if !wanted.iter().any(|w| &w.name == name) {
            retire(tx, name)?;
            applied.stopped.push(name.clone());
        }
    }
    for w in wanted {
        let config = w.config.to_string();
        match current.iter().find(|(name, _, _)| name == &w.name) {
            Some((_, old, interval)) => {
                let same = serde_json::from_str::<Value>(old).ok().as_ref() == Some(&w.config)
                    && *interval == w.interval_us;
                if !same {
                    tx.execute(
                        "UPDATE monitors SET config = ?2, interval_us = ?3, version = version + 1, \
                         next_due = ?4, updated_at = ?4 WHERE name = ?1",
                        params![w.name, config, w.interval_us, now],
                    )
                    .map_err(Error::sqlite("updating a managed monitor"))?;
                    applied.restarted.push(w.name.clone());
                }
            }
            None => {
                let inserted = tx
                    .execute(
                        "INSERT INTO monitors (name, kind, config, interval_us, next_due, \
                         created_at, updated_at, version, managed_by) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5, \
                         1 + coalesce((SELECT version FROM monitor_retired WHERE name = ?1), 0), ?6) \
                         ON CONFLICT (name) DO NOTHING",
                        params![w.name, w.kind, config, w.interval_us, now, owner],
                    )
                    .map_err(Error::sqlite("adding a managed monitor"))?;
                if inserted == 0 {
                    return Err(Error::bad_input(
                        "monitor name",
                        format!(
                            "a monitor named {:?} exists already and is not managed by {owner}; \
                             remove it or rename the node",
                            w.name
                        ),
                    ));
                }
                applied.started.push(w.name.clone());
            }
        }
    }
    Ok(applied)
}

/// The monitors each owner manages whose owner starts with `prefix`: (owner, name, config).
pub fn owned(conn: &Connection, prefix: &str) -> Result<Vec<(String, String, Value)>> {
    let mut stmt = conn
        .prepare(
            "SELECT managed_by, name, config FROM monitors \
             WHERE substr(managed_by, 1, length(?1)) = ?1 ORDER BY managed_by, name",
        )
        .map_err(Error::sqlite("reading the managed monitors"))?;
    let rows = stmt
        .query_map([prefix], |r| {
            let config: String = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                serde_json::from_str(&config).unwrap_or(Value::Null),
            ))
        })
        .map_err(Error::sqlite("reading the managed monitors"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(Error::sqlite("reading the managed monitors"))
}

const INFO_COLUMNS: &str = "name, kind, config, interval_us, version, enabled, next_due, last_ok, \
     last_summary, last_error, last_run_at, last_duration_ms, managed_by";

fn info_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MonitorInfo> {
    let config: String = r.get(2)?;
    let last_ok: Option<bool> = r.get(7)?;
    Ok(MonitorInfo {
        name: r.get(0)?,
        kind: r.get(1)?,
        config: serde_json::from_str(&config).unwrap_or(Value::String(config)),
        interval_seconds: r.get::<_, i64>(3)? as f64 / 1e6,
        version: r.get(4)?,
        enabled: r.get(5)?,
        next_due: format_micros(r.get(6)?),
        last_status: last_ok.map(|ok| if ok { "ok" } else { "error" }.to_owned()),
        last_summary: r.get(8)?,
        last_error: r.get(9)?,
        last_run_at: r.get::<_, Option<i64>>(10)?.map(format_micros),
        last_duration_ms: r.get(11)?,
        managed_by: r.get(12)?,
    })
}

pub fn list(conn: &Connection) -> Result<Vec<MonitorInfo>> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {INFO_COLUMNS} FROM monitors ORDER BY name"
        ))
        .map_err(Error::sqlite("listing monitors"))?;
    let rows = stmt
        .query_map([], info_row)
        .map_err(Error::sqlite("listing monitors"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::sqlite("listing monitors"))
}

pub fn show(conn: &Connection, name: &str) -> Result<MonitorInfo> {
    conn.query_row(
        &format!("SELECT {INFO_COLUMNS} FROM monitors WHERE name = ?1"),
        [name],
        info_row,
    )
    .optional()
    .map_err(Error::sqlite("reading the monitor"))?
    .ok_or_else(|| unknown(name))
}

/// A monitor whose round is due, as the foreman claims it.
#[derive(Debug)]
pub(crate) struct Due {
    pub name: String,
    pub kind: String,
    pub config: String,
    pub version: i64,
    pub interval_us: i64,
    pub next_due: i64,
    pub state: String,
}

/// Enabled monitors due at `now`, earliest first.
pub(crate) fn due(conn: &Connection, now: i64, limit: usize) -> Result<Vec<Due>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT name, kind, config, version, interval_us, next_due, state FROM monitors \
             WHERE enabled = 1 AND next_due <= ?1 ORDER BY next_due LIMIT ?2",
        )
        .map_err(Error::sqlite("reading due monitors"))?;
    let rows = stmt
        .query_map(params![now, limit as i64], |r| {
            Ok(Due {
                name: r.get(0)?,
                kind: r.get(1)?,
                config: r.get(2)?,
                version: r.get(3)?,
                interval_us: r.get(4)?,
                next_due: r.get(5)?,
                state: r.get(6)?,
            })
        })
        .map_err(Error::sqlite("reading due monitors"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Error::sqlite("reading due monitors"))
}

/// Moves a monitor's next round: one interval after the round just due, or one interval
/// from now if the schedule fell further behind (missed rounds are skipped, not queued).
/// Returns false, moving nothing, if the row no longer holds the schedule that `due` read:
/// another foreman on the same database took this round first, or the monitor was updated
/// or removed since.
pub(crate) fn reschedule(conn: &Connection, due: &Due, now: i64) -> Result<bool> {
    let mut next = due.next_due.saturating_add(due.interval_us);
    if next <= now {
        next = now.saturating_add(due.interval_us);
    }
    let moved = conn
        .prepare_cached(
            "UPDATE monitors SET next_due = ?2 WHERE name = ?1 AND version = ?3 AND next_due = ?4",
        )
        .and_then(|mut s| s.execute(params![due.name, next, due.version, due.next_due]))
        .map_err(Error::sqlite("rescheduling the monitor"))?;
    Ok(moved == 1)
}

/// The earliest next round of an enabled monitor.
pub(crate) fn next_due(conn: &Connection) -> Result<Option<i64>> {
    conn.prepare_cached("SELECT min(next_due) FROM monitors WHERE enabled = 1")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(Error::sqlite("reading the next monitor round"))
}

/// Records a round's result if its version is still current. Returns false when the
/// monitor was updated or removed meanwhile: the result is then discarded.
pub(crate) fn record(
    tx: &Transaction<'_>,
    result: &RoundResult,
    state: &Value,
    started_us: i64,
) -> Result<bool> {
    let changed = tx
        .prepare_cached(
            "UPDATE monitors SET state = ?3, last_ok = ?4, last_summary = ?5, last_error = ?6, \
             last_run_at = ?7, last_duration_ms = ?8 WHERE name = ?1 AND version = ?2",
        )
        .and_then(|mut s| {
            s.execute(params![
                result.monitor,
                result.version,
                state.to_string(),
                result.ok,
                result.summary(),
                result
                    .error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.code, e.message)),
                started_us,
                result.duration_ms,
            ])
        })
        .map_err(Error::sqlite("recording the round"))?;
    Ok(changed == 1)
}

/// Monitor counts for `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub total: i64,
    pub enabled: i64,
    pub failing: i64,
}

pub fn counts(conn: &Connection) -> Result<Counts> {
    conn.query_row(
        "SELECT count(*), coalesce(sum(enabled), 0), coalesce(sum(last_ok = 0), 0) FROM monitors",
        [],
        |r| {
            Ok(Counts {
                total: r.get(0)?,
                enabled: r.get(1)?,
                failing: r.get(2)?,
            })
        },
    )
    .map_err(Error::sqlite("counting monitors"))
}
