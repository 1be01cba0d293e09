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
