//! Where things live (SPEC "Files and configuration"): the home directory and the paths
//! under it, each of which a flag or `SNAPQ_*` variable can move.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tasks_file::TasksFile;

/// The resolved file layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub home: PathBuf,
    pub db: PathBuf,
    pub wakeup_dir: PathBuf,
    /// `None` with `--no-pid-file`.
    pub pid_file: Option<PathBuf>,
    pub telemetry_dir: PathBuf,
    /// Monitor results, one JSON object a line (the default sink).
    pub results_file: PathBuf,
    /// The command tasks' definitions (`--tasks`, else HOME/tasks.toml if it exists).
    pub tasks_file: TasksFile,
}

/// Overrides from the command line or environment (clap merges the two).
#[derive(Debug, Clone, Default)]
pub struct PathOverrides {
    pub home: Option<PathBuf>,
    pub db: Option<PathBuf>,
    pub wakeup_dir: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub no_pid_file: bool,
    pub telemetry_dir: Option<PathBuf>,
    pub tasks: Option<PathBuf>,
}

impl Paths {
    pub fn resolve(o: &PathOverrides) -> Result<Paths> {
        let home = match &o.home {
            Some(home) => home.clone(),
            None => default_home(
                std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
                std::env::var_os("HOME").map(PathBuf::from),
            )?,
        };
        let under =
            |given: &Option<PathBuf>, name: &str| given.clone().unwrap_or_else(|| home.join(name));
        Ok(Paths {
            db: under(&o.db, "snapq.sqlite3"),
            wakeup_dir: under(&o.wakeup_dir, "wakeup"),
            pid_file: (!o.no_pid_file).then(|| under(&o.pid_file, "snapq.pid")),
            telemetry_dir: under(&o.telemetry_dir, "telemetry"),
            results_file: home.join("results.jsonl"),
            tasks_file: TasksFile {
                required: o.tasks.is_some(),
                path: under(&o.tasks, "tasks.toml"),
            },
            home,
        })
    }
}

/// Whether `name` is a plain name, as monitors, schedules and command tasks have: 1 to
/// 200 of letters, digits, '_', '-' and '.' (it goes into routing keys, topics, logs).
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `$XDG_STATE_HOME/snapq`, else `~/.local/state/snapq`. The XDG spec says a relative
/// value is invalid and must be ignored.
fn default_home(xdg_state: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(state) = xdg_state.filter(|p| p.is_absolute()) {
        return Ok(state.join("snapq"));
    }
    match home.filter(|p| !p.as_os_str().is_empty()) {
        Some(home) => Ok(home.join(".local/state/snapq")),
        None => Err(Error::BadPath {
            role: "home",
            path: Path::new("~").to_owned(),
            problem: "is unknown (neither XDG_STATE_HOME nor HOME is set); give --home or \
                      SNAPQ_HOME"
                .into(),
        }),
    }
}

/// The group of `parent`, if it is writable by its group (and not by all): then what snapq
/// creates there (the database, the wake-up directory) is shared with that group, as the
/// service layout wants (README, "Running under systemd": members of the `snapq` group
/// enqueue). Else `None`: things are created as the umask says.
pub(crate) fn sharing_group(parent: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::fs::metadata(parent)
        .ok()
        // Writable by its group, not by everyone (/tmp is no group's shared place).
        .filter(|m| m.mode() & 0o022 == 0o020)
        .map(|m| m.gid())
}

/// Gives `file` (just created by this process) to `group`, readable and writable by it
/// (`mode`: 0o660 for a file, 0o2770 for a directory, whose new files then get the group
/// too), whatever the umask and the creator's primary group. A creator outside the group
/// cannot give the file to it and keeps its own: the next writer's error then says what is
/// wrong.
pub(crate) fn share_with(file: &std::fs::File, group: u32, mode: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: fchown(2) on a descriptor the caller owns; uid -1 leaves the owner as is.
    let _ = unsafe { libc::fchown(file.as_raw_fd(), u32::MAX, group) };
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_xdg() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            default_home(p("/state"), p("/root")).unwrap(),
            PathBuf::from("/state/snapq")
        );
        assert_eq!(
            default_home(p("relative"), p("/root")).unwrap(),
            PathBuf::from("/root/.local/state/snapq")
        );
        assert!(default_home(None, None).is_err());
    }

    #[test]
    fn overrides_win() {
        let paths = Paths::resolve(&PathOverrides {
            home: Some("/h".into()),
            db: Some("/elsewhere/q.db".into()),
            no_pid_file: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(paths.db, PathBuf::from("/elsewhere/q.db"));
        assert_eq!(paths.wakeup_dir, PathBuf::from("/h/wakeup"));
        assert_eq!(paths.pid_file, None);
        assert_eq!(paths.telemetry_dir, PathBuf::from("/h/telemetry"));
    }
}
