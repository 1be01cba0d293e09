//! The `foremen` table: one heartbeat row per running foreman (migrations/0001), which
//! `snapq status` reads and foremen on one database read to find each other and the dead.
//! A foreman registers at start, beats every `foreman::HEARTBEAT_INTERVAL`, and removes
//! its row when it stops; a row whose beat is stale and whose pid is no live snapq
//! process is a dead foreman's.

use rusqlite::{Connection, params};

use crate::clock::now_micros;
use crate::error::{Error, Result};

/// Writes this foreman's row (replacing one an earlier process with the same pid left).
pub(crate) fn register(conn: &Connection, pid: u32, started_at: i64, workers: usize) -> Result<()> {
    conn.execute(
        "INSERT INTO foremen (pid, started_at, beat_at, workers, running) VALUES (?1, ?2, ?2, ?3, 0) \
         ON CONFLICT (pid) DO UPDATE SET started_at = ?2, beat_at = ?2, workers = ?3, running = 0",
        params![pid, started_at, workers as i64],
    )
    .map(drop)
    .map_err(Error::sqlite("recording the foreman"))
}

/// One heartbeat: now, the tasks running, and the stop deadline while stopping.
pub(crate) fn beat(
    conn: &Connection,
    pid: u32,
    running: usize,
    stop_deadline: Option<i64>,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE foremen SET beat_at = ?1, running = ?2, stop_deadline = ?4 WHERE pid = ?3",
    )
    .and_then(|mut stmt| stmt.execute(params![now_micros(), running as i64, pid, stop_deadline]))
    .map(drop)
    .map_err(Error::sqlite("writing the heartbeat"))
}

/// Removes a foreman's row: this one's when it stops, or a dead one's.
pub(crate) fn unregister(conn: &Connection, pid: i64) -> Result<()> {
    conn.execute("DELETE FROM foremen WHERE pid = ?1", [pid])
        .map(drop)
        .map_err(Error::sqlite("removing a foreman's heartbeat row"))
}

/// The pids of the other foremen running on this database now: those whose heartbeat is
/// fresh and whose process is a live snapq. Not `me`: a foreman that has claimed nothing
/// yet owns no record, so one `running` under its pid is from an earlier process.
pub(crate) fn live_foremen(conn: &Connection, me: u32) -> Result<Vec<u32>> {
    let now = now_micros();
    let mut stmt = conn
        .prepare("SELECT pid, beat_at FROM foremen")
        .map_err(Error::sqlite("reading foremen"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(Error::sqlite("reading foremen"))?;
    let mut alive = Vec::new();
    for row in rows {
        let (pid, beat_at) = row.map_err(Error::sqlite("reading foremen"))?;
        let Ok(pid) = u32::try_from(pid) else {
            continue;
        };
        if pid != me
            && now - beat_at < crate::status::STALE_AFTER_MICROS
            && crate::pidfile::is_snapq_foreman(pid as i32)
        {
            alive.push(pid);
        }
    }
    Ok(alive)
}

/// The pids of foremen other than `me` whose beat is stale and whose process is no live
/// snapq: dead (kill -9, a crash).
pub(crate) fn dead_foremen(conn: &Connection, me: u32) -> Result<Vec<i64>> {
    let stale: Vec<i64> = conn
        .prepare_cached("SELECT pid FROM foremen WHERE pid != ?1 AND beat_at < ?2")
        .and_then(|mut s| {
            s.query_map(
                params![me, now_micros() - crate::status::STALE_AFTER_MICROS],
                |r| r.get(0),
            )?
            .collect()
        })
        .map_err(Error::sqlite("reading foremen"))?;
    Ok(stale
        .into_iter()
        .filter(|pid| !i32::try_from(*pid).is_ok_and(crate::pidfile::is_snapq_foreman))
        .collect())
}
