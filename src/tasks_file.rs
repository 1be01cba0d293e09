//! The task definitions file: `HOME/tasks.toml` (`--tasks`, `SNAPQ_TASKS`), where operators
//! define command tasks. This module reads and checks it, adds its tasks to a registry
//! (`with_commands`), and turns a task's bound arguments into an argv; src/command.rs runs
//! them. Enqueuers read it to check arguments before writing; the foreman reads it at
//! start and on SIGHUP.
//!
//! ```toml
//! [tasks.resize]
//! summary = "Resize one image"
//! command = ["/usr/local/bin/resize", "--width", "{width}", "--", "{path}"]
//! params = { path = "string", width = { type = "integer", default = 800 } }
//! timeout = 600
//! kill_after = 10
//! cwd = "/srv/app"
//! env = { APP_ENV = "production" }
//! output_bytes = 65536
//! retries = 5        # at least once: up to 5 runs after the first
//! backoff = 2.0      # seconds before the first retry, doubling
//! backoff_max = 3600 # the longest wait
//! jitter = true      # each wait 80–120% of its nominal length
//! ```
//!
//! Each `command` element is one argv element. `{name}` is replaced by the parameter's
//! text inside that element and never split or read by a shell; `{{` and `}}` are literal
//! braces. A parameter is a type name (required) or `{ type, default }` (optional).
//!
//! The file is refused when it cannot be trusted or read: group- or world-writable (as
//! sshd's StrictModes refuses such files), not TOML, an unknown key, type or placeholder.
//! Each error names the file and the line or field.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::registry::{Kind, Param, Registry, RetryPolicy, TaskSpec};

/// Where the tasks file is, and whether it must be there: a file named by `--tasks` or
/// `SNAPQ_TASKS` must; the default `HOME/tasks.toml` may be absent (no command tasks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TasksFile {
    pub path: PathBuf,
    pub required: bool,
}

impl TasksFile {
    /// `base` with the file's command tasks added. An absent default file adds none; a bad
    /// file is an error naming it (exit 2).
    pub fn with_commands(&self, base: &Registry) -> Result<Registry> {
        let mut registry = base.clone();
        if !self.required && !self.path.exists() {
            return Ok(registry);
        }
        registry.add_commands(load(&self.path)?, &self.path)?;
        Ok(registry)
    }

    /// Warns of each command task whose program is not there (it is `rejected` when it
    /// runs): the foreman's check when it loads the file.
    pub fn warn_of_missing_programs(&self, registry: &Registry) {
        for task in registry.commands() {
            if let Some(problem) = task.program_problem() {
                tracing::warn!(
                    task = %task.name,
                    file = %self.path.display(),
                    "{problem}: the task is rejected when it runs until that is mended"
                );
            }
        }
    }
}

/// What `kill_after` is when the file does not say: seconds between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_AFTER: Duration = Duration::from_secs(10);
/// What `output_bytes` is when the file does not say: the tail of output kept.
pub const DEFAULT_OUTPUT_BYTES: usize = 64 * 1024;

/// One command task, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandTask {
    pub name: String,
    pub summary: String,
    /// argv templates, in order.
    pub command: Vec<Template>,
    /// The command as the file writes it (for `snapq tasks`).
    pub command_text: Vec<String>,
    pub params: Vec<CommandParam>,
    /// None: no limit.
    pub timeout: Option<Duration>,
    pub kill_after: Duration,
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub output_bytes: usize,
    /// `retries` (with `backoff`, `backoff_max`, `jitter`): None without retries.
    pub retry: Option<RetryPolicy>,
}

/// A declared parameter: its type, and its default when it is optional.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandParam {
    pub name: String,
    pub kind: Kind,
    pub default: Option<Value>,
}

/// One argv element: literal text and placeholders, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(String),
}

impl Template {
    /// Parses `{name}` placeholders and `{{` / `}}` escapes.
    fn parse(text: &str) -> std::result::Result<Template, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!(
                            "{text:?}: a placeholder is {{name}} (letters, digits, _), and a \
                             literal brace is written {{{{ or }}}}"
                        ));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Param(name));
                }
                '}' => {
                    return Err(format!(
                        "{text:?}: a lone '}}' (write }}}} for a literal brace)"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() || pieces.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template(pieces))
    }

    fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Piece::Param(name) => Some(name.as_str()),
            Piece::Text(_) => None,
        })
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tasks: BTreeMap<String, RawTask>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    #[serde(default)]
    summary: String,
    command: Vec<String>,
    #[serde(default)]
    params: BTreeMap<String, RawParam>,
    timeout: Option<f64>,
    kill_after: Option<f64>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    output_bytes: Option<usize>,
    retries: Option<u32>,
    backoff: Option<f64>,
    backoff_max: Option<f64>,
    jitter: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawParam {
    Type(Kind),
    Full {
        #[serde(rename = "type")]
        kind: Kind,
        default: Option<toml::Value>,
    },
}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<Vec<CommandTask>> {
    let bad = |problem: String| Error::BadPath {
        role: "tasks file",
        path: path.to_owned(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "cannot be read ({e}); give --tasks an existing file"
        ))
    })?;
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(bad(format!(
            "is writable by {} (mode {:o}): anyone who can write it chooses what snapq runs; \
             chmod go-w it",
            if meta.permissions().mode() & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot be read ({e})")))?;
    parse(&text).map_err(bad)
}

/// Checks the text of a tasks file.
pub fn parse(text: &str) -> std::result::Result<Vec<CommandTask>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
    let mut tasks = Vec::new();
    for (name, raw) in file.tasks {
        tasks.push(check(&name, raw).map_err(|e| format!("[tasks.{name}] {e}"))?);
    }
    Ok(tasks)
}

fn check(name: &str, raw: RawTask) -> std::result::Result<CommandTask, String> {
    if !crate::config::is_plain_name(name) {
        return Err("a task name is 1 to 200 letters, digits, '_', '-' and '.'".into());
    }
    if raw.command.is_empty() {
        return Err("command: give at least the program, e.g. [\"/usr/local/bin/resize\"]".into());
    }
    if raw.command.iter().any(|a| a.contains('\0')) {
        return Err("command: an element contains a NUL byte".into());
    }
    let command = raw
        .command
        .iter()
        .map(|a| Template::parse(a))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("command: {e}"))?;
    if command[0].placeholders().next().is_some() {
        return Err("command: the program itself cannot be a parameter".into());
    }
    let mut params = Vec::new();
    for (param, raw) in raw.params {
        let (kind, default) = match raw {
            RawParam::Type(kind) => (kind, None),
            RawParam::Full { kind, default } => {
                let default = default
                    .map(|d| serde_json::to_value(d).map_err(|e| e.to_string()))
                    .transpose()
                    .map_err(|e| format!("params.{param}.default: {e}"))?;
                if let Some(d) = &default
                    && !kind.accepts(d)
                {
                    return Err(format!(
                        "params.{param}.default: {d} is not {}",
                        kind.described()
                    ));
                }
                (kind, default)
            }
        };
        params.push(CommandParam {
            name: param,
            kind,
            default,
        });
    }
    for placeholder in command.iter().flat_map(Template::placeholders) {
        if !params.iter().any(|p| p.name == placeholder) {
            return Err(format!(
                "command: {{{placeholder}}} names no parameter (params: {})",
                names(&params)
            ));
        }
    }
    let seconds =
        |field: &str, value: Option<f64>| -> std::result::Result<Option<Duration>, String> {
            match value {
                None => Ok(None),
                Some(s) if s.is_finite() && s > 0.0 && s <= 31_536_000.0 => {
                    Ok(Some(Duration::from_secs_f64(s)))
                }
                Some(s) => Err(format!("{field}: {s} is not a number of seconds above 0")),
            }
        };
    let retry = match raw.retries {
        Some(retries) if retries > 0 => {
            let mut policy = RetryPolicy::new(retries);
            if let Some(backoff) = seconds("backoff", raw.backoff)? {
                policy.backoff = backoff;
            }
            if let Some(max) = seconds("backoff_max", raw.backoff_max)? {
                policy.backoff_max = max;
            }
            if policy.backoff > policy.backoff_max {
                return Err(format!(
                    "backoff ({} s) is longer than backoff_max ({} s)",
                    policy.backoff.as_secs_f64(),
                    policy.backoff_max.as_secs_f64()
                ));
            }
            policy.jitter = raw.jitter.unwrap_or(true);
            Some(policy)
        }
        None if raw.backoff.is_some() || raw.backoff_max.is_some() || raw.jitter.is_some() => {
            return Err(
                "backoff, backoff_max and jitter shape retries: give retries = N too".into(),
            );
        }
        _ => None,
    };
    Ok(CommandTask {
        name: name.to_owned(),
        summary: raw.summary,
        command,
        command_text: raw.command,
        params,
        timeout: seconds("timeout", raw.timeout)?,
        kill_after: seconds("kill_after", raw.kill_after)?.unwrap_or(DEFAULT_KILL_AFTER),
        cwd: raw.cwd,
        env: raw.env,
        output_bytes: raw.output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES),
        retry,
    })
}

fn names(params: &[CommandParam]) -> String {
    if params.is_empty() {
        return "none".into();
    }
    params
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl CommandTask {
    /// The task's spec for the registry: its parameters with the registry's types
    /// (required unless they have a default), their values bound for argv.
    pub fn spec(&self) -> TaskSpec {
        let summary = if self.summary.is_empty() {
            format!("runs {}", self.program())
        } else {
            self.summary.clone()
        };
        TaskSpec {
            name: self.name.clone(),
            summary,
            params: self
                .params
                .iter()
                .map(|p| Param {
                    name: p.name.clone(),
                    kind: p.kind,
                    required: p.default.is_none(),
                    argv: true,
                })
                .collect(),
            retry: self.retry,
        }
    }

    /// The program, as the file names it (the first command element has no placeholder).
    pub fn program(&self) -> String {
        self.command[0]
            .0
            .iter()
            .map(|piece| match piece {
                Piece::Text(t) => t.as_str(),
                Piece::Param(_) => "",
            })
            .collect()
    }

    /// Why the program cannot be run as things stand, if it cannot: a path that is not
    /// an executable file, or a bare name found on no directory of PATH.
    pub fn program_problem(&self) -> Option<String> {
        let program = self.program();
        if program.contains('/') {
            let path = match &self.cwd {
                Some(cwd) => cwd.join(&program),
                None => PathBuf::from(&program),
            };
            return (!crate::spawn::is_executable(&path))
                .then(|| format!("{program} is not an executable file"));
        }
        // Looked up as it will be when it runs: in the task's PATH if it sets one.
        let path = self
            .env
            .get("PATH")
            .map(std::ffi::OsString::from)
            .or_else(|| std::env::var_os("PATH"));
        crate::spawn::resolve(&program, path.as_deref(), self.cwd.as_deref()).err()
    }

    /// The argv for `bound` (the parameters by name, as the registry binds them): each
    /// placeholder replaced by its value's text, defaults filled in. An error says which
    /// parameter is missing or of the wrong type, or which value holds a NUL byte.
    pub fn argv(&self, bound: &Map<String, Value>) -> std::result::Result<Vec<String>, String> {
        let mut values: BTreeMap<&str, String> = BTreeMap::new();
        for param in &self.params {
            let value = match (bound.get(&param.name), &param.default) {
                (Some(v), _) | (None, Some(v)) => v,
                (None, None) => return Err(format!("{} is required", param.name)),
            };
            if !param.kind.accepts(value) {
                return Err(format!(
                    "{} must be {}, not {value}",
                    param.name,
                    param.kind.described()
                ));
            }
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if text.contains('\0') {
                return Err(format!("{} contains a NUL byte", param.name));
            }
            values.insert(param.name.as_str(), text);
        }
        Ok(self
            .command
            .iter()
            .map(|template| {
                template
                    .0
                    .iter()
                    .map(|piece| match piece {
                        Piece::Text(t) => t.as_str(),
                        Piece::Param(p) => values.get(p.as_str()).map_or("", String::as_str),
                    })
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXAMPLE: &str = r#"
[tasks.resize]
summary = "Resize one image"
command = ["/usr/local/bin/resize", "--width", "{width}", "--", "{path}", "--tag={{{tag}}}"]
params = { path = "string", width = { type = "integer", default = 800 }, tag = "string" }
timeout = 600
cwd = "/srv/app"
env = { APP_ENV = "production" }
"#;

    #[test]
    fn a_task_becomes_one_argv_element_per_command_element() {
        let tasks = parse(EXAMPLE).unwrap();
        let resize = &tasks[0];
        assert_eq!(resize.name, "resize");
        assert_eq!(resize.timeout, Some(Duration::from_secs(600)));
        assert_eq!(resize.kill_after, DEFAULT_KILL_AFTER);
        assert_eq!(resize.output_bytes, DEFAULT_OUTPUT_BYTES);
        assert_eq!(resize.retry, None, "no retries unless asked: at most once");
        let retried = parse(
            "[tasks.r]\ncommand = [\"/bin/true\"]\nretries = 3\nbackoff = 0.5\njitter = false\n",
        )
        .unwrap();
        let policy = retried[0].retry.unwrap();
        assert_eq!(
            (
                policy.retries,
                policy.backoff,
                policy.backoff_max,
                policy.jitter
            ),
            (
                3,
                Duration::from_millis(500),
                Duration::from_secs(3600),
                false
            )
        );
        assert_eq!(retried[0].spec().retry, Some(policy));
        let hostile = "a b; rm -rf / $(x) 'q' \"d\" -n";
        let argv = resize
            .argv(json!({"path": hostile, "tag": "-x"}).as_object().unwrap())
            .unwrap();
        assert_eq!(
            argv,
            [
                "/usr/local/bin/resize",
                "--width",
                "800",
                "--",
                hostile,
                "--tag={-x}"
            ]
        );
        let err = resize
            .argv(
                json!({"path": "p", "tag": "t", "width": 1.5})
                    .as_object()
                    .unwrap(),
            )
            .unwrap_err();
        assert!(err.contains("width must be an integer"), "{err}");
        let err = resize
            .argv(json!({"tag": "t"}).as_object().unwrap())
            .unwrap_err();
        assert!(err.contains("path is required"), "{err}");
        let err = resize
            .argv(json!({"path": "a\u{0}b", "tag": "t"}).as_object().unwrap())
            .unwrap_err();
        assert!(err.contains("NUL"), "{err}");

        // `any` takes any JSON value: a string as it is, anything else as JSON text.
        let tasks =
            parse("[tasks.j]\ncommand = [\"/bin/echo\", \"{v}\"]\nparams = { v = \"any\" }\n")
                .unwrap();
        let argv = |v: Value| {
            tasks[0]
                .argv(json!({ "v": v }).as_object().unwrap())
                .unwrap()
        };
        assert_eq!(argv(json!("a b"))[1], "a b");
        assert_eq!(argv(json!({"k": [1, 2]}))[1], r#"{"k":[1,2]}"#);
    }

    #[test]
    fn bad_files_name_the_line_or_field() {
        for (text, says) in [
            ("[tasks.x]\ncommand = [\"/bin/true\"\n", "line"),
            (
                "[tasks.x]\ncommand = [\"/bin/echo\", \"{who}\"]\n",
                "{who} names no parameter",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/echo\"]\nparams = { n = \"float\" }\n",
                "line 3",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/true\"]\ncolour = 1\n",
                "colour",
            ),
            ("[tasks.x]\ncommand = []\n", "command: give at least"),
            (
                "[tasks.x]\ncommand = [\"{prog}\"]\nparams = { prog = \"string\" }\n",
                "program itself",
            ),
            ("[tasks.x]\ncommand = [\"/bin/echo\", \"}\"]\n", "lone"),
            (
                "[tasks.x]\ncommand = [\"/bin/true\"]\ntimeout = -1\n",
                "timeout",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/echo\"]\nparams = { n = { type = \"integer\", default = \"a\" } }\n",
                "params.n.default",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/true\"]\nbackoff = 1\n",
                "give retries = N too",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/true\"]\nretries = 2\nbackoff = 10\nbackoff_max = 5\n",
                "longer than backoff_max",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/true\"]\nretries = -1\n",
                "retries",
            ),
            (
                "[tasks.x]\ncommand = [\"/bin/true\"]\nretries = 2\nbackoff = 0\n",
                "backoff",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn a_file_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("writable by its group"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&path).unwrap().len(), 1);
    }
}
