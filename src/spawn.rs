//! Starting a command's process the way `posix_spawn` does — `clone(CLONE_VM |
//! CLONE_VFORK)`, the child running on a small stack of its own until it execs — with
//! what `posix_spawn` cannot do: the parent-death signal.
//!
//! Why not `std::process::Command`: it needs a `pre_exec` hook to set the parent-death
//! signal, and with one it must `fork`, which copies the foreman's page tables for every
//! command. That cost grows with the foreman's memory; with it 5,000 `/bin/true` tasks
//! drained at ~55% of the rate `Command` reaches without the hook (BENCHMARKS.md,
//! "Command tasks"). Here the child shares the parent's memory until `execve`, as in
//! glibc's `posix_spawn`, and the worker thread that calls `spawn` is suspended meanwhile.
//!
//! Everything the child needs (paths, argv, environment, descriptors) is prepared before
//! the clone. The child only makes system calls that are async-signal-safe and touch
//! nothing but the prepared plan: it moves into a process group of its own, resets the
//! foreman's handled signals and SIGPIPE (Rust ignores it; a child expects the default)
//! and clears its signal mask (every signal is blocked across the clone), sets the
//! parent-death signal to SIGKILL, checks that its parent still lives, puts /dev/null on
//! stdin and the output pipe on stdout and stderr, changes directory, and execs. If a step
//! fails it writes which and its errno into the plan and exits 127; the parent, resumed
//! when the child has exec'd or exited, reads that and reaps the child.

use std::cell::Cell;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The child's stack until it execs: its frames are a handful of system calls.
const CHILD_STACK: usize = 64 * 1024;

/// A started command.
#[derive(Debug)]
pub struct Spawned {
    pub pid: libc::pid_t,
    /// The read end of the pipe that is the command's stdout and stderr both.
    pub output: File,
}

/// What the child does, prepared by the parent.
struct Plan {
    program: CString,
    /// Null-terminated arrays of pointers into `_argv` and `_envp`.
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    /// Descriptors at 3 or above (so that moving them onto 0, 1 and 2 cannot collide).
    devnull: OwnedFd,
    output: OwnedFd,
    parent: libc::pid_t,
    /// Written by the child if a step fails: the step's index and errno. Read by the
    /// parent only after the child has exited (CLONE_VFORK suspends the parent until then).
    failed: Cell<(libc::c_int, libc::c_int)>,
}

/// What systemd gives the service itself, and a command must not take for its own: the
/// notify socket and watchdog (a command would speak for the foreman), the journal stream
/// (a command's stderr is snapq's pipe, not the journal) and passed sockets.
const SERVICE_ONLY: [&str; 7] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// The command's environment: the foreman's (`inherited`) but for `SERVICE_ONLY`, with
/// `env` added over it.
fn child_environment(
    inherited: impl Iterator<Item = (OsString, OsString)>,
    env: &[(OsString, OsString)],
) -> std::collections::BTreeMap<OsString, OsString> {
    let mut environment: std::collections::BTreeMap<OsString, OsString> = inherited
        .filter(|(k, _)| !SERVICE_ONLY.iter().any(|s| k == OsStr::new(s)))
        .collect();
    environment.extend(env.iter().cloned());
    environment
}

/// The child's steps, as `Plan::failed` names them.
const STEPS: [&str; 7] = [
    "moving into a process group of its own",
    "clearing its signal mask",
    "setting the parent-death signal",
    "checking that the foreman still runs",
    "setting up stdin, stdout and stderr",
    "changing to the task's directory",
    "executing the program",
];

/// Starts `argv[0]` (a path, or a name looked up in the `PATH` the command will have)
/// with `argv`, the foreman's environment with `env` added, in `cwd` if given.
pub fn spawn(
    argv: &[String],
    env: &[(OsString, OsString)],
    cwd: Option<&Path>,
) -> Result<Spawned, String> {
    let program = argv.first().ok_or("the command is empty")?;
    let cstring = |what: &str, bytes: &[u8]| {
        CString::new(bytes).map_err(|_| format!("{what} holds a NUL byte"))
    };
    let args = argv
        .iter()
        .map(|a| cstring("an argument", a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let environment = child_environment(std::env::vars_os(), env);
    let vars = environment
        .iter()
        .map(|(k, v)| {
            let mut pair = k.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(v.as_bytes());
            cstring("an environment variable", &pair)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = environment.get(OsStr::new("PATH")).cloned();
    let resolved = resolve(program, path.as_deref(), cwd)?;

    let devnull = File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;
    let (read_end, write_end) = pipe()?;
    let plan = Plan {
        program: cstring("the program's path", resolved.as_os_str().as_bytes())?,
        argv: args
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        envp: vars
            .iter()
            .map(|v| v.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        cwd: cwd
            .map(|c| cstring("the task's directory", c.as_os_str().as_bytes()))
            .transpose()?,
        devnull: above_stdio(devnull.into())?,
        output: above_stdio(write_end)?,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        failed: Cell::new((-1, 0)),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its end, 16-byte aligned as the ABI wants.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    // Every signal blocked across the clone, so that none reaches the child while it still
    // has the foreman's handlers (signal-hook's would tell the foreman it got a signal);
    // the child resets those and then unblocks.
    // SAFETY: sigset_t is plain data; pthread_sigmask only reads and writes the two sets.
    let previous = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        previous
    };
    // SAFETY: the child runs `child` on `stack`, sharing this memory, while this thread is
    // suspended (CLONE_VFORK) until it has exec'd or exited; `plan`, `args`, `vars` and
    // `stack` outlive that. `child` only makes system calls on the plan's data.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&plan as *const Plan).cast_mut().cast(),
        )
    };
    let clone_error = std::io::Error::last_os_error();
    // SAFETY: restores this thread's own mask, saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(format!("cannot start a process: {clone_error}"));
    }
    // The child is done with the plan (it has exec'd or exited).
    let (step, errno) = plan.failed.get();
    drop(stack);
    if step >= 0 {
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let what = STEPS.get(step as usize).copied().unwrap_or("starting");
        return Err(format!(
            "{program}: {what}: {}",
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    Ok(Spawned {
        pid,
        output: File::from(read_end),
    })
}

/// The child, between the clone and the exec. Only system calls, only on the plan.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Plan`, alive and not touched by the suspended parent
    // until this process execs or exits.
    unsafe {
        let plan = &*arg.cast::<Plan>();
        let fail = |plan: &Plan, step: libc::c_int| -> ! {
            plan.failed.set((step, *libc::__errno_location()));
            libc::_exit(127)
        };
        if libc::setpgid(0, 0) != 0 {
            fail(plan, 0);
        }
        // The foreman's handled signals back to their defaults (exec would do it, but a
        // signal could come before), and SIGPIPE, which Rust ignores, too; then nothing
        // blocked.
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(signal, libc::SIG_DFL);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
            fail(plan, 1);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(plan, 2);
        }
        // The foreman died before the signal was set: run nothing.
        if libc::getppid() != plan.parent {
            *libc::__errno_location() = libc::ESRCH;
            fail(plan, 3);
        }
        let output = plan.output.as_raw_fd();
        if libc::dup2(plan.devnull.as_raw_fd(), 0) < 0
            || libc::dup2(output, 1) < 0
            || libc::dup2(output, 2) < 0
        {
            fail(plan, 4);
        }
        if let Some(cwd) = &plan.cwd
            && libc::chdir(cwd.as_ptr()) != 0
        {
            fail(plan, 5);
        }
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(plan, 6)
    }
}

/// A pipe, both ends close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot make the output pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd` itself if it is 3 or above, else a close-on-exec duplicate that is (a foreman
/// started with stdin or stdout closed gets low numbers for new descriptors).
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, String> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl duplicates a descriptor we own; the new one is owned by nothing else.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(format!(
            "cannot duplicate a descriptor: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// The path to exec: `program` itself if it has a slash (relative to `cwd` then, as the
/// child will be there), else the first executable file of that name in `path`.
pub(crate) fn resolve(
    program: &str,
    path: Option<&OsStr>,
    cwd: Option<&Path>,
) -> Result<PathBuf, String> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path)
        .map(|dir| match (dir.is_relative(), cwd) {
            (true, Some(cwd)) => cwd.join(dir).join(program),
            _ => dir.join(program),
        })
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("{program}: not found on PATH ({})", path.to_string_lossy()))
}

/// Whether `path` is a file someone may execute.
pub(crate) fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn wait(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: reaping our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn the_child_gets_its_arguments_environment_directory_and_group() {
        let mut child = spawn(
            &[
                "sh".into(),
                "-c".into(),
                "echo \"$1|$X|$(pwd)\"; echo err >&2; ps -o pgid= -p $$; cat".into(),
                "sh".into(),
                "a b".into(),
            ],
            &[("X".into(), "y z".into())],
            Some(Path::new("/tmp")),
        )
        .unwrap();
        let mut out = String::new();
        child.output.read_to_string(&mut out).unwrap();
        let status = wait(child.pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("a b|y z|/tmp"));
        assert_eq!(lines.next(), Some("err"));
        // Its own process group; stdin is /dev/null, so `cat` ended at once.
        assert_eq!(
            lines.next().map(str::trim),
            Some(child.pid.to_string().as_str())
        );
    }

    #[test]
    fn the_child_blocks_and_ignores_no_signal() {
        let mut child = spawn(
            // grep reads its own status (a shell blocks signals while it waits for one).
            &[
                "grep".into(),
                "-E".into(),
                "^Sig(Blk|Ign)".into(),
                "/proc/self/status".into(),
            ],
            &[],
            None,
        )
        .unwrap();
        let mut out = String::new();
        child.output.read_to_string(&mut out).unwrap();
        wait(child.pid);
        // Nothing blocked; SIGPIPE (13, bit 0x1000) not ignored, as Rust has it here.
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let ignored = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(ignored & 0x1000, 0, "{out}");
    }

    #[test]
    fn the_services_own_variables_are_not_passed_on() {
        let inherited = [
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("JOURNAL_STREAM", "8:123"),
            ("PATH", "/usr/bin"),
            ("X", "old"),
        ]
        .into_iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_environment(inherited, &[("X".into(), "new".into())]);
        let names: Vec<&str> = env.keys().filter_map(|k| k.to_str()).collect();
        assert_eq!(names, ["PATH", "X"]);
        assert_eq!(env[OsStr::new("X")], "new");
    }

    #[test]
    fn what_cannot_start_says_why() {
        let err = spawn(&["/no/such/program".into()], &[], None).unwrap_err();
        assert!(
            err.contains("executing the program") && err.contains("No such file"),
            "{err}"
        );
        let err = spawn(&["no-such-program-anywhere".into()], &[], None).unwrap_err();
        assert!(err.contains("not found on PATH"), "{err}");
        let err = spawn(&["/bin/true".into()], &[], Some(Path::new("/no/such/dir"))).unwrap_err();
        assert!(err.contains("changing to the task's directory"), "{err}");
    }
}
