//! Running one command task as a child process, on the worker thread that runs the task.
//!
//! The worker thread that runs the task does all of it, with no thread per stream:
//! - It spawns the child (src/spawn.rs) in a process group of its own, with stdin from
//!   /dev/null and the parent-death signal set to SIGKILL. If the foreman dies under
//!   `kill -9`, the kernel kills the child; its own children stay in the group.
//! - stdout and stderr are one pipe, so the output keeps the order the command wrote it
//!   in; the worker polls it together with the child's pidfd (which becomes readable when
//!   the child ends), keeping only the last `output_bytes`.
//! - It reaps the child when it ends.
//!
//! Past `timeout` the group gets SIGTERM, and `kill_after` later SIGKILL; the same when
//! the pool's stop flag is set (the foreman stopping past its graceful deadline), checked
//! at least every `POLL_STEP`. When the child ends, whatever it left in its group (a
//! background grandchild holding the pipes) is killed too. A command leaves nothing
//! running.
//!
//! The parent-death signal is tied to the thread that spawned the child, not to the
//! process: the pool's worker threads live as long as the foreman, so the child is killed
//! when the foreman dies, not before.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::spawn;
use crate::tasks_file::CommandTask;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it (not ours).
    Signalled(i32),
    /// It ran past its timeout and was killed.
    TimedOut,
    /// The stop flag was set (the foreman's graceful deadline passed) and it was killed.
    Stopped,
    /// It could not be started: the OS error.
    NotStarted(String),
}

/// What running a command gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub ended: Ended,
    /// The exit code, if it exited (also after a SIGTERM it handled).
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did (ours after a timeout, or another).
    pub signal: Option<i32>,
    /// The last `output_bytes` of stdout and stderr, interleaved as they came.
    pub output: Vec<u8>,
    /// Whether earlier output was dropped to keep the tail within `output_bytes`.
    pub truncated: bool,
}

/// The longest the loop waits on the pipes before it looks at the clock, the child and
/// the stop flag again.
const POLL_STEP: Duration = Duration::from_millis(100);

/// The longest output line passed to `on_line`; the rest of a longer line is dropped.
const MAX_LINE: usize = 1024;

/// What gets each output line of a running command.
pub type OnLine<'a> = dyn FnMut(&[u8]) + 'a;

/// Runs `argv` as `task` says, with `env` added to the task's own environment. `stop`
/// ends it early as a timeout would; `on_line`, if given, gets each output line as it
/// comes (without its newline; at most `MAX_LINE` bytes of it).
pub fn run(
    task: &CommandTask,
    argv: &[String],
    env: &[(&str, String)],
    stop: &AtomicBool,
    mut on_line: Option<&mut OnLine<'_>>,
) -> Run {
    let not_started = |why: String| Run {
        ended: Ended::NotStarted(why),
        exit_code: None,
        signal: None,
        output: Vec::new(),
        truncated: false,
    };
    let env: Vec<(OsString, OsString)> = task
        .env
        .iter()
        .map(|(k, v)| (k.into(), v.into()))
        .chain(env.iter().map(|(k, v)| ((*k).into(), v.into())))
        .collect();
    let spawned = match spawn::spawn(argv, &env, task.cwd.as_deref()) {
        Ok(spawned) => spawned,
        Err(e) => return not_started(e),
    };
    let group = spawned.pid;
    let exit_fd = pidfd_open(group);
    let mut pipes: Vec<Box<dyn ReadFd>> = vec![Box::new(spawned.output)];
    let mut tail = Tail::new(task.output_bytes);
    let started = Instant::now();
    let deadline = task.timeout.map(|t| started + t);
    let mut terminated_at: Option<Instant> = None;
    let mut stopped = false;
    let mut status = None;
    let mut line = Vec::new();
    loop {
        // Once the child has ended, read only what is already in the pipes.
        let wait = if status.is_some() {
            Duration::ZERO
        } else {
            let next = match (terminated_at, deadline) {
                (Some(t), _) => Some(t + task.kill_after),
                (None, d) => d,
            };
            next.map_or(POLL_STEP, |n| n.saturating_duration_since(Instant::now()))
                .min(POLL_STEP)
        };
        let ended_before = status.is_some();
        let exit = exit_fd
            .as_ref()
            .filter(|_| status.is_none())
            .map(AsRawFd::as_raw_fd);
        let (open, read) = match on_line.as_deref_mut() {
            Some(each) => poll_into(&mut pipes, &mut tail, wait, exit, &mut |chunk: &[u8]| {
                split_lines(&mut line, chunk, each)
            }),
            None => poll_into(&mut pipes, &mut tail, wait, exit, &mut |_: &[u8]| {}),
        };
        if status.is_none() {
            status = reap(group, libc::WNOHANG);
        }
        // After the end: read until the pipes are empty (or closed), then stop, even if a
        // leftover process still holds them open.
        if status.is_some() && (!open || (ended_before && !read)) {
            break;
        }
        let now = Instant::now();
        match terminated_at {
            None if status.is_none() && deadline.is_some_and(|d| now >= d) => {
                signal_group(group, libc::SIGTERM);
                terminated_at = Some(now);
            }
            // Relaxed: a request read at the next turn; it guards no other data.
            None if status.is_none() && stop.load(Ordering::Relaxed) => {
                signal_group(group, libc::SIGTERM);
                terminated_at = Some(now);
                stopped = true;
            }
            Some(t) if now >= t + task.kill_after => {
                signal_group(group, libc::SIGKILL);
            }
            _ => {}
        }
    }
    // Whatever the command left in its group goes with it.
    signal_group(group, libc::SIGKILL);
    let status = match status.or_else(|| reap(group, 0)) {
        Some(status) => status,
        None => {
            return not_started(format!(
                "waiting for {}: {}",
                argv[0],
                std::io::Error::last_os_error()
            ));
        }
    };
    if let Some(each) = on_line
        && !line.is_empty()
    {
        each(&line);
    }
    let exit_code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
    let ended = if stopped {
        Ended::Stopped
    } else if terminated_at.is_some() {
        Ended::TimedOut
    } else if let Some(code) = exit_code {
        Ended::Exited(code)
    } else {
        Ended::Signalled(signal.unwrap_or(0))
    };
    let (output, truncated) = tail.finish();
    Run {
        ended,
        exit_code,
        signal,
        output,
        truncated,
    }
}

/// The child's wait status once it has ended (`flags` 0 waits for that; `WNOHANG` does
/// not), reaping it; None while it runs, or if it cannot be waited for.
fn reap(pid: libc::pid_t, flags: libc::c_int) -> Option<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing into `status`.
        match unsafe { libc::waitpid(pid, &mut status, flags) } {
            r if r == pid => return Some(status),
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
}

fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    unsafe {
        libc::kill(-group, signal);
    }
}

/// A pipe the poll loop reads: a readable file descriptor.
trait ReadFd: Read + AsRawFd {}
impl<T: Read + AsRawFd> ReadFd for T {}

/// Passes each complete line of `chunk` (with what `line` held before it) to `each`;
/// keeps an unfinished line in `line`, at most `MAX_LINE` bytes of it.
fn split_lines(line: &mut Vec<u8>, chunk: &[u8], each: &mut dyn FnMut(&[u8])) {
    let mut rest = chunk;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&rest[..end.min(room)]);
        each(line);
        line.clear();
        rest = &rest[end + 1..];
    }
    let room = MAX_LINE.saturating_sub(line.len());
    line.extend_from_slice(&rest[..rest.len().min(room)]);
}

/// How often the loop looks at the child where the kernel gives no pidfd to wait on.
const FALLBACK_STEP: Duration = Duration::from_millis(2);

/// A descriptor that becomes readable when the child `pid` ends (pidfd_open(2), Linux
/// 5.3), so the poll that reads its pipes also wakes at its exit. Without it the loop
/// would sleep a whole poll step after a short command closed its pipes: /bin/true took
/// ~40 ms a task that way (BENCHMARKS.md, "Command tasks").
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the descriptor was just created and is owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to `wait` for output on any open pipe, or for `exit` (the child's pidfd, while
/// it runs) to become readable, and reads what came into `tail` (and `seen`); pipes at end
/// of file are dropped. Returns whether any pipe is still open, and whether anything was
/// read.
fn poll_into(
    pipes: &mut Vec<Box<dyn ReadFd>>,
    tail: &mut Tail,
    wait: Duration,
    exit: Option<RawFd>,
    seen: &mut dyn FnMut(&[u8]),
) -> (bool, bool) {
    let mut fds: Vec<libc::pollfd> = pipes
        .iter()
        .map(|p| p.as_raw_fd())
        .chain(exit)
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Without a pidfd the child's end wakes nothing: look again soon.
    let wait = if exit.is_none() {
        wait.min(FALLBACK_STEP)
    } else {
        wait
    };
    if fds.is_empty() {
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        return (false, false);
    }
    let timeout = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    if ready <= 0 {
        return (!pipes.is_empty(), false);
    }
    let mut read = false;
    let mut closed = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    for (i, fd) in fds.iter().enumerate().take(pipes.len()) {
        if fd.revents == 0 {
            continue;
        }
        match pipes[i].read(&mut buf) {
            Ok(0) => closed.push(i),
            Ok(n) => {
                tail.push(&buf[..n]);
                seen(&buf[..n]);
                read = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => closed.push(i),
        }
    }
    for i in closed.into_iter().rev() {
        pipes.remove(i);
    }
    (!pipes.is_empty(), read)
}

/// The last `cap` bytes written to it.
struct Tail {
    cap: usize,
    bytes: VecDeque<u8>,
    dropped: bool,
}

impl Tail {
    fn new(cap: usize) -> Tail {
        Tail {
            cap,
            bytes: VecDeque::new(),
            dropped: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            self.dropped = true;
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.bytes.len() + data.len()).saturating_sub(self.cap);
        if over > 0 {
            self.dropped = true;
            self.bytes.drain(..over);
        }
        self.bytes.extend(data);
    }

    fn finish(self) -> (Vec<u8>, bool) {
        (self.bytes.into(), self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks_file::parse;

    fn task(extra: &str) -> CommandTask {
        parse(&format!("[tasks.t]\ncommand = [\"/bin/sh\"]\n{extra}"))
            .unwrap()
            .remove(0)
    }

    fn sh(task: &CommandTask, script: &str) -> Run {
        run(
            task,
            &["/bin/sh".into(), "-c".into(), script.into()],
            &[("SNAPQ_TASK_ID", "7".into())],
            &AtomicBool::new(false),
            None,
        )
    }

    fn alive(pid: &str) -> bool {
        crate::pidfile::process_runs(pid.trim().parse().unwrap())
    }

    #[test]
    fn exit_codes_signals_env_and_cwd() {
        let t = task("cwd = \"/tmp\"\nenv = { GREETING = \"hi there\" }\n");
        let r = sh(
            &t,
            "echo \"$GREETING $SNAPQ_TASK_ID $(pwd)\"; echo oops >&2; exit 3",
        );
        assert_eq!(r.ended, Ended::Exited(3));
        let out = String::from_utf8(r.output).unwrap();
        assert!(out.contains("hi there 7 /tmp"), "{out}");
        assert!(out.contains("oops"), "{out}");
        assert_eq!(
            sh(&t, "kill -USR1 $$").ended,
            Ended::Signalled(libc::SIGUSR1)
        );
        let r = run(
            &t,
            &["/no/such/program".into()],
            &[],
            &AtomicBool::new(false),
            None,
        );
        assert!(matches!(r.ended, Ended::NotStarted(ref e) if e.contains("/no/such/program")));
    }

    #[test]
    fn only_the_tail_of_a_flood_is_kept() {
        let t = task("output_bytes = 1000\n");
        let r = sh(&t, "head -c 1048576 /dev/zero | tr '\\0' a; echo END");
        assert_eq!(r.ended, Ended::Exited(0));
        assert_eq!(r.output.len(), 1000);
        assert!(r.truncated);
        assert!(r.output.ends_with(b"aEND\n"));
        // Output still in the pipes when the command exits is read to the end, even with
        // a background child holding them open.
        let t = task("");
        let r = sh(
            &t,
            "sleep 5 & head -c 60000 /dev/zero | tr '\\0' b; echo END",
        );
        assert_eq!(r.ended, Ended::Exited(0));
        assert_eq!(r.output.len(), 60004, "{}", r.output.len());
    }

    #[test]
    fn a_timeout_kills_the_whole_group_and_a_leftover_grandchild_goes_too() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let t = task("timeout = 0.5\nkill_after = 0.5\n");
        let started = Instant::now();
        // The shell ignores SIGTERM, so SIGKILL is needed after kill_after.
        let r = sh(
            &t,
            &format!(
                "trap '' TERM; sleep 100 & echo $! > {}; wait",
                pidfile.display()
            ),
        );
        assert_eq!(r.ended, Ended::TimedOut);
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            started.elapsed()
        );
        let grandchild = std::fs::read_to_string(&pidfile).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(&grandchild), "the grandchild outlived the timeout");

        // A command that exits and leaves a background child holding its pipes.
        let t = task("");
        let started = Instant::now();
        let r = sh(
            &t,
            &format!("sleep 100 & echo $! > {}; exit 0", pidfile.display()),
        );
        assert_eq!(r.ended, Ended::Exited(0));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let grandchild = std::fs::read_to_string(&pidfile).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !alive(&grandchild),
            "a background grandchild was left running"
        );
    }

    #[test]
    fn output_lines_are_passed_on_and_the_stop_flag_ends_the_command() {
        let t = task("");
        let mut lines = Vec::new();
        let mut each = |l: &[u8]| lines.push(String::from_utf8_lossy(l).into_owned());
        let r = run(
            &t,
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo one; printf 'two\\nthree'".into(),
            ],
            &[],
            &AtomicBool::new(false),
            Some(&mut each),
        );
        assert_eq!(r.ended, Ended::Exited(0));
        assert_eq!(lines, ["one", "two", "three"]);

        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::Relaxed);
            });
            run(
                &t,
                &["/bin/sh".into(), "-c".into(), "sleep 100".into()],
                &[],
                &stop,
                None,
            )
        });
        assert_eq!(r.ended, Ended::Stopped);
        assert_eq!(r.signal, Some(libc::SIGTERM));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
