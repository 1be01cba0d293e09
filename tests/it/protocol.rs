//! The wake-up protocol as README documents it for other languages: README's own Python
//! and shell examples, run against a foreman that does not re-read the queue by itself.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{Foreman, Home, read_lines, wait_until};

/// The first fenced block of `lang` in README.md that contains `needle`.
fn readme_block(lang: &str, needle: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let fence = format!("```{lang}\n");
    readme
        .split(&fence)
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains(needle))
        .unwrap_or_else(|| panic!("README.md has no ```{lang} block with {needle:?}"))
        .to_owned()
}

/// A foreman on `HOME/.local/state/snapq`, the default home the examples write to, with
/// the safety re-read out of reach so only the wake-up can start the task.
fn foreman_on_default_home(home: &Home) -> Foreman {
    let mut cmd = home.cmd();
    cmd.env_remove("SNAPQ_HOME")
        .env_remove("XDG_STATE_HOME")
        .env("HOME", home.path())
        .args(["run", "--log-format", "json", "--safety-interval", "600"]);
    Foreman::spawn(cmd)
}

/// Runs README's `lang` example (found by `needle`) with `interpreter -c`, writing to a
/// file of the test's own, and waits for the task it enqueued to write `line`.
fn run_example(lang: &str, needle: &str, interpreter: &str, line: &str) {
    let home = Home::new();
    let foreman = foreman_on_default_home(&home);
    let out = home.file("out.txt");
    let code = readme_block(lang, needle).replace("/tmp/out.txt", out.to_str().unwrap());
    let status = Command::new(interpreter)
        .args(["-c", &code])
        .env("HOME", home.path())
        .status()
        .unwrap();
    assert!(status.success(), "README's {lang} example failed");
    assert!(
        wait_until(Duration::from_secs(5), || read_lines(&out) == [line]),
        "the task did not run:\n{}",
        foreman.log_text()
    );
}

#[test]
fn readme_python_example_enqueues_and_wakes() {
    run_example("python", "O_EXCL", "python3", "from python");
}

#[test]
fn readme_shell_example_enqueues_and_wakes() {
    if Command::new("sqlite3").arg("--version").output().is_err() {
        eprintln!("skipped: no sqlite3 command on this machine (apt-get install sqlite3)");
        return;
    }
    run_example("sh", "touch", "bash", "from sh");
}

/// Any file created in the wake-up directory wakes the foreman, and is removed.
#[test]
fn any_new_file_in_the_wakeup_directory_wakes_the_foreman() {
    let home = Home::new();
    let mut cmd = home.cmd();
    cmd.args(["run", "--log-format", "json", "--safety-interval", "600"]);
    let foreman = Foreman::spawn(cmd);
    let out = home.file("out.txt");
    let conn = home.conn();
    for (i, name) in ["x-1", "another.name", "wake"].iter().enumerate() {
        let line = format!("line-{i}");
        conn.execute(
            "INSERT INTO tasks (task_name, kwargs) VALUES ('append', ?1)",
            [serde_json::json!({"path": out, "line": line}).to_string()],
        )
        .unwrap();
        std::fs::write(home.file("wakeup").join(name), "").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || read_lines(&out).len() == i + 1),
            "a file named {name:?} did not wake the foreman:\n{}",
            foreman.log_text()
        );
    }
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_dir(home.file("wakeup")).unwrap().count() == 0
    }));
}

/// Issue 13, item 6: a wake-up directory removed under a running foreman (a tmp cleaner,
/// an operator's `rm -rf`) is made again and watched again at once; wake-ups keep working
/// without waiting for the safety re-read (out of reach here).
#[test]
fn a_removed_wakeup_directory_is_made_again_and_watched() {
    let home = Home::new();
    let mut cmd = home.cmd();
    cmd.args(["run", "--log-format", "json", "--safety-interval", "600"]);
    let foreman = Foreman::spawn(cmd);
    let out = home.file("out.txt");
    let wakeup = home.file("wakeup");
    for round in 0..2 {
        std::fs::remove_dir_all(&wakeup).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || foreman
                .events(
                    "the wake-up directory was removed or replaced; made it again and \
                         watching it (something cleans it: keep it out of tmp cleaners, e.g. \
                         systemd's RuntimeDirectory)"
                )
                .len()
                == round + 1),
            "no warning that the directory was made again:\n{}",
            foreman.log_text()
        );
        assert!(wakeup.is_dir());
        let line = format!("after-removal-{round}");
        let kwargs = serde_json::json!({"path": out, "line": line}).to_string();
        home.ok(&["enqueue", "append", "--kwargs", &kwargs]);
        assert!(
            wait_until(Duration::from_secs(3), || read_lines(&out).last()
                == Some(&line)),
            "the enqueue after the removal did not wake the foreman:\n{}",
            foreman.log_text()
        );
    }
}
