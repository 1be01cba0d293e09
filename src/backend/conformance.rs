//! The conformance suite of the queue interface: what every backend must do, written once
//! against `QueueBackend` and run on each (tests/it/conformance.rs: SQLite here; the
//! RabbitMQ backend runs the same functions against the real broker). Each function
//! panics, naming the backend, where a backend breaks the contract.
//!
//! A backend's test supplies a `Harness`: fresh handles on one queue that nothing else
//! uses. Handles of one harness are one process: their leases name the same foreman, so
//! "a foreman died" is played by rescuing with an empty list of live foremen.
#![allow(clippy::unwrap_used)] // a test suite: a panic is its failed assertion

use std::time::{Duration, Instant};

use super::{Lease, QueueBackend};
use crate::clock::{micros_of, now_micros};
use crate::queue::{NewTask, When};
use crate::records::{Cancelled, Finish};
use crate::registry::RetryPolicy;

/// Handles on one empty queue.
pub trait Harness {
    /// A consumer: the foreman's handle (claims, settles, gets wake-ups).
    fn consumer(&self) -> Box<dyn QueueBackend>;
    /// A producer: an enqueuer's handle.
    fn producer(&self) -> Box<dyn QueueBackend>;
}

/// Every check, in order.
pub fn run_all(h: &dyn Harness) {
    claims_in_due_order_and_at_most_once(h);
    a_delayed_task_waits_for_its_time(h);
    ends_are_recorded(h);
    a_failed_lease_comes_back_until_its_attempts_run_out(h);
    a_held_lease_is_not_claimed_by_another_consumer(h);
    released_leases_are_claimed_again_as_they_were(h);
    a_dead_consumers_tasks_are_lost_or_rescued(h);
    an_enqueue_wakes_the_consumer(h);
    drained_only_once_every_due_task_was_claimed(h);
    counts_see_due_and_delayed_tasks(h);
    capabilities_hold(h);
}

fn no_retries(_: &str) -> Option<RetryPolicy> {
    None
}

/// Retries for `retried` tasks only: 2 retries, 0.2 s apart, exactly.
fn retried(name: &str) -> Option<RetryPolicy> {
    (name == "retried").then_some(RetryPolicy {
        retries: 2,
        backoff: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        jitter: false,
    })
}

fn task(name: &str, when: When) -> NewTask {
    NewTask {
        when,
        ..NewTask::new(name)
    }
}

fn end(lease: &Lease, state: &'static str, error: Option<&str>) -> Finish {
    Finish {
        id: lease.task.id,
        state,
        error: error.map(str::to_owned),
        at: now_micros(),
        command: None,
        retry: lease.retry,
    }
}

fn sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids
}

/// Enqueues a `retried` (at least once), then a `noop` (at most once), and claims both;
/// returns their ids, the noop's first, and the leases (in the backend's order). The lease
/// comes first on purpose: whatever takes the noop off the queue at claim must leave the
/// older lease held (one cumulative broker ack up to the noop would not).
fn one_of_each(p: &mut dyn QueueBackend, c: &mut dyn QueueBackend) -> (Vec<i64>, Vec<Lease>) {
    let ids_sent = p
        .enqueue(&[task("retried", When::Now), task("noop", When::Now)])
        .unwrap();
    let sent = vec![ids_sent[1], ids_sent[0]];
    let got = claim_within(c, 2, Duration::from_secs(5), &retried);
    assert_eq!(sorted(ids(&got)), sorted(sent.clone()), "{}", c.name());
    (sent, got)
}

/// Settles every lease `succeeded` and writes the ends.
fn succeed(c: &mut dyn QueueBackend, leases: &[Lease]) {
    for lease in leases {
        c.settle(end(lease, "succeeded", None));
    }
    c.flush().unwrap();
}

fn ids(leases: &[Lease]) -> Vec<i64> {
    leases.iter().map(|l| l.task.id).collect()
}

/// Claims until `want` tasks came or `within` passed.
fn claim_within(
    q: &mut dyn QueueBackend,
    want: usize,
    within: Duration,
    policy: &dyn Fn(&str) -> Option<RetryPolicy>,
) -> Vec<Lease> {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < until {
        got.extend(q.claim(want - got.len(), policy).unwrap());
        if got.len() < want {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    got
}

fn state(q: &mut dyn QueueBackend, id: i64) -> String {
    q.show(id)
        .unwrap()
        .map_or_else(|| "(no such task)".into(), |r| r.state)
}

/// Enqueued tasks come out oldest due first, each once.
pub fn claims_in_due_order_and_at_most_once(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    let first = p.enqueue(&[task("noop", When::Now)]).unwrap();
    let at = now_micros() - 1_000_000;
    // Due a second ago: before the first.
    let earlier = p.enqueue(&[task("noop", When::At(at))]).unwrap();
    let bulk = p
        .enqueue(&[task("noop", When::Now), task("noop", When::Now)])
        .unwrap();
    assert_eq!(bulk.len(), 2, "{name}: a bulk enqueue returns every id");
    let mut all: Vec<i64> = [first.clone(), earlier.clone(), bulk.clone()].concat();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 4, "{name}: ids repeat");
    // One at a time: the order within one claim's batch is the backend's (they all start
    // at once), the order between claims is due order.
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(claim_within(
            c.as_mut(),
            1,
            Duration::from_secs(5),
            &no_retries,
        ));
    }
    let due_order = [earlier, first, bulk].concat();
    if c.capabilities().due_order {
        assert_eq!(ids(&got), due_order, "{name}: not in due order");
    } else {
        assert_eq!(sorted(ids(&got)), sorted(due_order), "{name}");
    }
    assert!(got.iter().all(|l| l.retry.is_none() && l.task.attempt == 1));
    for lease in &got {
        assert_eq!(state(c.as_mut(), lease.task.id), "running", "{name}");
    }
    assert!(
        c.claim(10, &no_retries).unwrap().is_empty(),
        "{name}: a claimed task was claimed again"
    );
    succeed(c.as_mut(), &got);
}

/// A delayed task is not claimed early, `next_due` names its time, and it comes once due.
pub fn a_delayed_task_waits_for_its_time(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    let resolution = c.capabilities().delay_resolution;
    let delay = Duration::from_millis(300).max(resolution);
    let before = now_micros();
    let id = p.enqueue(&[task("noop", When::After(delay))]).unwrap()[0];
    assert!(
        c.claim(10, &no_retries).unwrap().is_empty(),
        "{name}: claimed before due"
    );
    if c.capabilities().shows_queued {
        assert_eq!(state(c.as_mut(), id), "queued", "{name}");
    }
    if let Some(due) = c.next_due().unwrap() {
        let expected = before + micros_of(delay);
        assert!(
            (due - expected).abs() <= micros_of(resolution) + 200_000,
            "{name}: next_due {due}, expected about {expected}"
        );
    }
    let got = claim_within(c.as_mut(), 1, delay + Duration::from_secs(5), &no_retries);
    assert_eq!(ids(&got), [id], "{name}: the delayed task never came");
    assert!(
        now_micros() >= before + micros_of(delay),
        "{name}: the delayed task came early"
    );
    succeed(c.as_mut(), &got[..1]);
}

/// `settle` then `flush` (or the next claim) records each end.
pub fn ends_are_recorded(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    p.enqueue(&[
        task("noop", When::Now),
        task("noop", When::Now),
        task("noop", When::Now),
    ])
    .unwrap();
    let got = claim_within(c.as_mut(), 3, Duration::from_secs(5), &no_retries);
    assert_eq!(got.len(), 3, "{name}");
    c.settle(end(&got[0], "succeeded", None));
    c.settle(end(&got[1], "failed", Some("it broke")));
    assert_eq!(c.flush().unwrap(), None, "{name}: nothing was retried");
    // The third's end rides on the next claim.
    c.settle(end(&got[2], "panicked", Some("boom")));
    assert!(c.claim(1, &no_retries).unwrap().is_empty());
    for (lease, expected) in got.iter().zip(["succeeded", "failed", "panicked"]) {
        let record = c.show(lease.task.id).unwrap().unwrap();
        assert_eq!(record.state, expected, "{name}: {record:?}");
    }
    let failed = c.show(got[1].task.id).unwrap().unwrap();
    assert_eq!(failed.error.as_deref(), Some("it broke"), "{name}");
    assert!(c.show(i64::MAX).unwrap().is_none(), "{name}: an unknown id");
}

/// An at-least-once task that fails is back after its backoff with its next attempt, and
/// `dead` after the last.
pub fn a_failed_lease_comes_back_until_its_attempts_run_out(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    let id = p.enqueue(&[task("retried", When::Now)]).unwrap()[0];
    let backoff = Duration::from_millis(200).max(c.capabilities().delay_resolution);
    for attempt in 1..=3 {
        let got = claim_within(c.as_mut(), 1, backoff + Duration::from_secs(5), &retried);
        assert_eq!(ids(&got), [id], "{name}: attempt {attempt} never came");
        assert_eq!(got[0].task.attempt, attempt, "{name}");
        assert!(got[0].retry.is_some(), "{name}: claimed without its policy");
        let failed_at = now_micros();
        c.settle(end(&got[0], "failed", Some("not yet")));
        let back = c.flush().unwrap();
        if attempt < 3 {
            let due = back.expect("a retry is due again");
            // Backoff 0.2 s doubling: 0.2 s, then 0.4 s (a backend with a coarser delay
            // rounds it up when it waits, after this).
            let wait = 200_000 << (attempt - 1);
            assert!(due >= failed_at + wait, "{name}: back too early");
            let record = c.show(id).unwrap().unwrap();
            assert_eq!(
                (record.state.as_str(), record.attempt),
                ("queued", attempt + 1),
                "{name}"
            );
            assert!(
                c.claim(1, &retried).unwrap().is_empty(),
                "{name}: claimed before its backoff"
            );
        } else {
            assert_eq!(back, None, "{name}");
        }
    }
    let record = c.show(id).unwrap().unwrap();
    assert_eq!(
        (record.state.as_str(), record.attempt),
        ("dead", 3),
        "{name}"
    );
}

/// What one consumer holds, another does not get.
pub fn a_held_lease_is_not_claimed_by_another_consumer(h: &dyn Harness) {
    let (mut p, mut a, mut b) = (h.producer(), h.consumer(), h.consumer());
    let name = a.name();
    let id = p.enqueue(&[task("retried", When::Now)]).unwrap()[0];
    let got = claim_within(a.as_mut(), 1, Duration::from_secs(5), &retried);
    assert_eq!(ids(&got), [id], "{name}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        b.claim(10, &retried).unwrap().is_empty(),
        "{name}: a held lease was claimed by another consumer"
    );
    succeed(a.as_mut(), &got);
    assert_eq!(state(b.as_mut(), id), "succeeded", "{name}");
}

/// Released leases come back as they were: same ids, same attempt, no run recorded.
pub fn released_leases_are_claimed_again_as_they_were(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    let (sent, got) = one_of_each(p.as_mut(), c.as_mut());
    c.release(got).unwrap();
    for &id in &sent {
        assert_eq!(state(c.as_mut(), id), "queued", "{name}");
    }
    let again = claim_within(c.as_mut(), 2, Duration::from_secs(5), &retried);
    assert_eq!(
        sorted(ids(&again)),
        sorted(sent),
        "{name}: released tasks did not come back"
    );
    assert!(again.iter().all(|l| l.task.attempt == 1), "{name}");
    succeed(c.as_mut(), &again);
}

/// A consumer that died: its at-most-once tasks are `lost`, its leases back in the queue
/// with their next attempt (put back by `rescue`, or by the broker itself when the dead
/// consumer's connection went: then `rescue` records them `abandoned` here).
pub fn a_dead_consumers_tasks_are_lost_or_rescued(h: &dyn Harness) {
    let (mut p, mut dead) = (h.producer(), h.consumer());
    let name = dead.name();
    let (sent, got) = one_of_each(p.as_mut(), dead.as_mut());
    // While its foreman lives, nothing is rescued.
    assert!(
        dead.rescue(&[std::process::id()]).unwrap().is_empty(),
        "{name}"
    );
    drop(dead);
    let mut c = h.consumer();
    let mut orphans = c.rescue(&[]).unwrap();
    // The noop's first.
    orphans.sort_by_key(|o| o.id != sent[0]);
    let states: Vec<&str> = orphans.iter().map(|o| o.state.as_str()).collect();
    assert!(
        matches!(states.as_slice(), ["lost", "queued" | "abandoned"]),
        "{name}: {orphans:?}"
    );
    assert_eq!(state(c.as_mut(), sent[0]), "lost", "{name}");
    let back = claim_within(c.as_mut(), 1, Duration::from_secs(5), &retried);
    assert_eq!(ids(&back), [sent[1]], "{name}: the lease was not put back");
    assert_eq!(
        back[0].task.attempt, 2,
        "{name}: a rescue counts as an attempt"
    );
    succeed(c.as_mut(), &back);
    // An end that comes after a rescue (the old run finishing late) changes nothing.
    let late: Vec<Lease> = got.into_iter().filter(|l| l.task.id == sent[0]).collect();
    succeed(c.as_mut(), &late);
    assert_eq!(state(c.as_mut(), sent[0]), "lost", "{name}");
}

/// An enqueue by another handle wakes a waiting consumer.
pub fn an_enqueue_wakes_the_consumer(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    // A consumer that has claimed (a broker's starts consuming then) and found nothing.
    assert!(c.claim(1, &no_retries).unwrap().is_empty(), "{name}");
    let wake_ups = c.wake_ups();
    while wake_ups.try_recv().is_ok() {}
    let id = p.enqueue(&[task("noop", When::Now)]).unwrap()[0];
    assert!(
        wake_ups.recv_timeout(Duration::from_secs(2)).is_ok(),
        "{name}: no wake-up within 2 s of an enqueue"
    );
    let got = claim_within(c.as_mut(), 1, Duration::from_secs(5), &no_retries);
    assert_eq!(ids(&got), [id], "{name}");
    succeed(c.as_mut(), &got[..1]);
}

/// `drained` (asked after a short claim; `run --burst` ends on it) is true only once every
/// due task was claimed: not while one is ready, in the consumer's hands, or still on its
/// way to it. More tasks than a foreman of 4 workers holds at once on RabbitMQ (32): the
/// claim of the 32nd frees room, and the broker hands out the rest while `drained` asks.
/// Before the fix that made the RabbitMQ backend cancel its consumer first, it said
/// drained with 32 of 40 claimed in every run of three (a `--burst` foreman left, and the
/// broker put the 8 back in the queue after the other foremen had left too). Ten rounds.
pub fn drained_only_once_every_due_task_was_claimed(h: &dyn Harness) {
    const TASKS: usize = 40;
    for round in 1..=10 {
        let (mut p, mut c) = (h.producer(), h.consumer());
        let name = c.name();
        p.enqueue(&vec![task("noop", When::Now); TASKS]).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            let asked = (TASKS - got.len()).max(1);
            let claimed = c.claim(asked, &no_retries).unwrap();
            let short = claimed.len() < asked;
            got.extend(claimed);
            if short && c.drained().unwrap() {
                break;
            }
            assert!(
                Instant::now() < until,
                "{name}, round {round}: not drained within 10 s, {} of {TASKS} claimed",
                got.len()
            );
        }
        assert_eq!(
            got.len(),
            TASKS,
            "{name}, round {round}: drained with {} of {TASKS} tasks claimed",
            got.len()
        );
        succeed(c.as_mut(), &got);
    }
}

/// Counts see due and delayed tasks, exactly or as "at least", as the backend says.
pub fn counts_see_due_and_delayed_tasks(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    let exact = c.capabilities().exact_counts;
    p.enqueue(&[
        task("noop", When::Now),
        task("noop", When::Now),
        task("noop", When::After(Duration::from_secs(3600))),
    ])
    .unwrap();
    let counts = c.counts(now_micros()).unwrap();
    if exact {
        assert_eq!((counts.due, counts.delayed), (2, 1), "{name}: {counts:?}");
        assert!(counts.next_delayed.is_some(), "{name}");
    } else {
        assert!(counts.due + counts.delayed <= 3, "{name}: {counts:?}");
    }
    let got = claim_within(c.as_mut(), 2, Duration::from_secs(5), &no_retries);
    succeed(c.as_mut(), &got);
    if exact {
        let counts = c.counts(now_micros()).unwrap();
        assert_eq!((counts.due, counts.delayed), (0, 1), "{name}: {counts:?}");
    }
}

/// What the capabilities promise works; what they deny fails naming the backend.
pub fn capabilities_hold(h: &dyn Harness) {
    let (mut p, mut c) = (h.producer(), h.consumer());
    let name = c.name();
    let sent = p
        .enqueue(&[
            task("noop", When::After(Duration::from_secs(3600))),
            task("noop", When::Now),
        ])
        .unwrap();
    if c.capabilities().cancel_by_id {
        assert_eq!(c.cancel(sent[0]).unwrap(), Cancelled::Done, "{name}");
        assert_eq!(state(c.as_mut(), sent[0]), "cancelled", "{name}");
        let got = claim_within(c.as_mut(), 1, Duration::from_secs(5), &no_retries);
        assert_eq!(ids(&got), [sent[1]], "{name}");
        assert_eq!(c.cancel(sent[1]).unwrap(), Cancelled::Running, "{name}");
        assert_eq!(c.cancel(i64::MAX).unwrap(), Cancelled::Unknown, "{name}");
        succeed(c.as_mut(), &got[..1]);
    } else {
        let e = c.cancel(sent[0]).unwrap_err();
        assert!(e.to_string().contains(name), "{name}: {e}");
        assert_eq!(e.exit_code(), 2, "{name}");
    }
}
