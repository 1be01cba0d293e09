//! Issue 13, item 11: under the service layout, members of the service's group enqueue.
//! Two real uids that share a group (numeric ids: no accounts needed), each with umask 022:
//! whoever creates the database, the other can write it. Needs root to switch uids.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use crate::support::Home;

const GROUP: u32 = 47_100;
const ALICE: u32 = 47_101;
const BOB: u32 = 47_102;

fn as_user(home: &Home, uid: u32, args: &[&str]) -> std::process::Output {
    let mut cmd = home.cmd();
    cmd.args(args).uid(uid).gid(GROUP).env("HOME", home.path());
    // (std drops the supplementary groups when it sets the uid as root.)
    // SAFETY: runs in the child between fork and exec; umask(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn members_of_the_directorys_group_share_the_database() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching uids needs root (CI runs as root)");
        return;
    }
    let home = Home::new();
    // The service's StateDirectory: its group may write, new files get its group.
    let dir = home.path();
    std::os::unix::fs::chown(dir, Some(ALICE), Some(GROUP)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2770)).unwrap();

    let out = as_user(&home, ALICE, &["enqueue", "noop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["snapq.sqlite3", "snapq.sqlite3-wal", "snapq.sqlite3-shm"] {
        let path = home.file(name);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        assert_eq!(meta.mode() & 0o060, 0o060, "{name} is {:o}", meta.mode());
        assert_eq!(meta.gid(), GROUP, "{name}");
    }
    let out = as_user(&home, BOB, &["enqueue", "noop"]);
    assert!(
        out.status.success(),
        "the other member cannot enqueue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_user(&home, BOB, &["run", "--burst", "--no-telemetry"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_user(&home, ALICE, &["enqueue", "noop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(home.queued(), 1);
}
