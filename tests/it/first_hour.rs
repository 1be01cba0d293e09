//! Frictions a new user meets in the first hour (issue 13, items 13 on).

use crate::support::Home;

/// Item 13: a mistyped --home is not silent. `enqueue` into a database no foreman has ever
/// opened warns, naming the path; `status` says when the database does not exist.
#[test]
fn a_home_no_foreman_ever_used_is_pointed_out() {
    let home = Home::new();
    let typo = home.file("snapq-typo");
    let typo_arg = typo.to_str().unwrap();

    let status = home.snapq(&["--home", typo_arg, "status"]);
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("it does not exist"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&home.ok(&["--home", typo_arg, "status", "--json"])).unwrap();
    assert_eq!(json["db_exists"], false, "{json}");

    let out = home.snapq(&["--home", typo_arg, "enqueue", "noop"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(
        stderr.contains("no foreman has ever opened the database")
            && stderr.contains(&format!("{typo_arg}/snapq.sqlite3")),
        "{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&home.ok(&["--home", typo_arg, "status", "--json"])).unwrap();
    assert_eq!(json["db_exists"], true, "{json}");

    // Once a foreman has run there, enqueues say nothing more.
    home.ok(&["--home", typo_arg, "run", "--burst"]);
    let out = home.snapq(&["--home", typo_arg, "enqueue", "noop"]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("no foreman"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Item 17, the small things seen at once (the page's two are in tests/it/browser.rs, the
/// telemetry files' rotation in src/telemetry.rs's tests).
#[test]
fn small_things_a_new_user_sees_at_once() {
    let home = Home::new();
    let out = home.file("out.txt");

    // One error style, usage errors included: `snapq: error: …`, exit 2.
    let typo = home.snapq(&["enqueu", "noop"]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&typo.stderr).starts_with("snapq: error:"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );
    // The --kwargs hint shows an object, --args an array.
    let bad = home.snapq(&["enqueue", "sleep", "--kwargs", "{seconds: 1}"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains(r#"e.g. '{"seconds": 2}'"#), "{stderr}");
    let bad = home.snapq(&["enqueue", "noop", "--args", "[1,"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("e.g. '[1, \"a\"]'"));

    // Every argument of every command has a description, and global options stand apart.
    for command in [
        &["enqueue"][..],
        &["run"],
        &["monitor", "add"],
        &["monitor", "update"],
        &["monitor", "remove"],
        &["monitor", "list"],
        &["monitor", "show"],
        &["status"],
        &["tasks"],
        &["stats"],
    ] {
        let mut args = command.to_vec();
        // The short help: each option and its description on one line.
        args.push("-h");
        let help = home.ok(&args);
        assert!(help.contains("Global options"), "{args:?}:\n{help}");
        let own = help.split("Global options").next().unwrap();
        for line in own.lines().map(str::trim) {
            let undescribed =
                (line.starts_with("--") || line.starts_with('<')) && !line.contains("  ");
            assert!(
                !undescribed,
                "{args:?}: no description for {line:?}:\n{help}"
            );
        }
    }

    // `monitor add system` needs no --config.
    home.ok(&["monitor", "add", "system", "host", "--interval", "0.2"]);

    // `enqueue --file --ids` prints each new id.
    let lines = crate::support::append_lines(&out, "bulk", 0..3);
    let input = home.file("bulk.jsonl");
    std::fs::write(&input, lines).unwrap();
    let ids = home.ok(&["enqueue", "--file", input.to_str().unwrap(), "--ids"]);
    let ids: Vec<i64> = ids.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    // The same field looks the same in every line: `task=append` at start and at end.
    let run = home.cmd().args(["run", "--burst"]).output().unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("task ")).collect();
    assert!(lines.len() >= 6, "{log}");
    for line in &lines {
        assert!(line.contains("task=append"), "{line}");
    }

    // Numbers as people read them: bytes as integers, percentages to two decimals.
    let mut foreman = home.start(&[]);
    let results = home.file("results.jsonl");
    let mut second = None;
    assert!(crate::support::wait_until(
        std::time::Duration::from_secs(5),
        || {
            second = std::fs::read_to_string(&results)
                .unwrap_or_default()
                .lines()
                .nth(1)
                .map(str::to_owned);
            second.is_some()
        }
    ));
    foreman.stop();
    let second = second.unwrap();
    let data: serde_json::Value = serde_json::from_str(&second).unwrap();
    let data = &data["data"];
    assert!(data["memory_total_bytes"].is_u64(), "{second}");
    for key in ["cpu_percent", "memory_used_percent"] {
        let text = data[key].to_string();
        let decimals = text.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 2, "{key} = {text}");
    }

    // A due time from long ago reads in days, not in hundreds of millions of seconds.
    home.conn()
        .execute(
            "INSERT INTO tasks (task_name, created_at) VALUES ('noop', 1)",
            [],
        )
        .unwrap();
    let status = home.ok(&["status"]);
    assert!(status.contains("days ago"), "{status}");
}

/// Item 14: README is true for a new user. It names no file the repository lacks
/// (SPEC.md), says how to get `snapq` on the PATH, its `--at` example works today, and
/// every SNAPQ_ variable it names (and systemd/snapq.env sets) is one snapq reads. Its Rust
/// example is compiled by `cargo test` (`ReadmeDoctests` in src/lib.rs).
#[test]
fn readme_is_true_for_a_new_user() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    for (name, text) in [("README.md", &readme), ("ARCHITECTURE.md", &architecture)] {
        assert!(
            !text.contains("SPEC"),
            "{name} refers to SPEC.md, which is not here"
        );
    }
    assert!(readme.contains("cargo install --path ."));

    // The --at example, run as written with this build's snapq first on the PATH.
    let home = Home::new();
    let at = readme
        .lines()
        .skip_while(|l| !l.contains("\"line\": \"in an hour\""))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/tmp/out.txt", home.file("out.txt").to_str().unwrap());
    assert!(at.contains("--at"), "{at}");
    let bin_dir = std::path::Path::new(crate::support::BIN).parent().unwrap();
    let command = at.replace("\\\n", " ");
    let command = command.split('#').next().unwrap();
    let run = std::process::Command::new("bash")
        .args(["-c", command])
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .env("SNAPQ_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{at}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["tasks"]["delayed"], 1, "{status}");

    // Every variable README and snapq.env name is one the help names.
    let mut help = String::new();
    for command in [&[][..], &["run"], &["enqueue"], &["status"]] {
        let mut args = command.to_vec();
        args.push("--help");
        help.push_str(&home.ok(&args));
    }
    let env_file = std::fs::read_to_string(root.join("systemd/snapq.env")).unwrap();
    for text in [&readme, &env_file] {
        for (at, _) in text.match_indices("SNAPQ_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if name == "SNAPQ_" {
                continue; // SNAPQ_<FLAG>
            }
            // What snapq sets for a command task, not what it reads (tests/it/commands.rs
            // checks that each command sees them).
            if ["SNAPQ_TASK_ID", "SNAPQ_TASK_NAME", "SNAPQ_ATTEMPT"].contains(&name.as_str()) {
                continue;
            }
            assert!(
                help.contains(&format!("env: {name}=")),
                "{name} is read by no option"
            );
        }
    }
}

/// Item 18 (and issue 14's lock-file check): no amiquip, hence no nom 4 (the build's
/// future-incompatibility warning), no net2 (RUSTSEC-2020-0016), no idna 0.1
/// (RUSTSEC-2024-0421) in the lock file.
#[test]
fn the_lock_file_has_no_unmaintained_rabbitmq_client_or_its_advisories() {
    let lock = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"),
    )
    .unwrap();
    let packages: Vec<(String, String)> = lock
        .split("[[package]]")
        .filter_map(|p| {
            let field = |key: &str| {
                p.lines()
                    .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
            };
            Some((field("name")?, field("version")?))
        })
        .collect();
    assert!(packages.iter().any(|(n, _)| n == "lapin"));
    for (name, version) in &packages {
        let bad = name == "amiquip"
            || name == "net2"
            || (name == "nom" && version.starts_with("4."))
            || (name == "idna" && version.starts_with("0.1"));
        assert!(!bad, "{name} {version} is in Cargo.lock");
    }
}
