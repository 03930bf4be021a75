//! Monitoring: `check` (a Nagios/Icinga plugin over a repository) and `backup --metrics` (a
//! Prometheus node-exporter textfile), on plain Maildirs written by the test; the plugin's
//! `maildir_backup_metrics` setting is tested in tests/plugin.rs.
//!
//! - `check_tells_ok_warning_critical_and_unknown`: a missing repository is UNKNOWN (3), an empty
//!   one CRITICAL; two fresh users are OK with perfdata; a named user with no backup, an old
//!   newest snapshot and a truncated message are CRITICAL, a failed last run (recorded in the
//!   repository although nothing was published) a WARNING; a size-preserving corruption passes
//!   the quick check and fails `--deep`; bad usage is UNKNOWN.
//! - `metrics_file_keeps_every_user_and_parses_strictly`: successes and a failure of two users,
//!   then eight users backed up at once into one file: every user is there (the runs take turns),
//!   the values are the reports', and the file parses under a strict text-format parser.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use support::promtext::{self, user_value};
use support::*;

/// A Maildir with `n` messages in INBOX and in `.Sent`.
fn maildir(root: &Path, n: usize) -> PathBuf {
    for folder in ["", ".Sent"] {
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(root.join(folder).join(sub)).unwrap();
        }
        for i in 0..n {
            let name = format!("17000000{i:02}.M{i}P1.test{}:2,S", folder.len());
            fs::write(root.join(folder).join("cur").join(name), format!("Subject: {i}\r\n\r\nbody {}\r\n", "x".repeat(i * 10))).unwrap();
        }
    }
    root.to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `check ARGS...`: (exit code, stdout).
fn check(args: &[&str]) -> (i32, String) {
    let mut all = vec!["check"];
    all.extend(args);
    let r = cli(&all);
    (r.code().unwrap_or(-1), r.stdout.clone())
}

fn snapshot_of(repo: &Path, user: &str) -> PathBuf {
    let series = repo.join(user);
    let mut snaps: Vec<PathBuf> = fs::read_dir(&series).unwrap().map(|e| e.unwrap().path()).filter(|p| fs::symlink_metadata(p).unwrap().is_dir()).collect();
    snaps.sort();
    snaps.pop().unwrap_or_else(|| panic!("no snapshot in {}", series.display()))
}

#[test]
fn check_tells_ok_warning_critical_and_unknown() {
    let t = tempdir();
    let repo = t.path().join("repo");
    let (code, out) = check(&[s(&repo)]);
    assert_eq!(code, 3, "{out}");
    assert!(out.starts_with("MAILDIR-BACKUP UNKNOWN: "), "{out}");
    fs::create_dir(&repo).unwrap();
    let (code, out) = check(&[s(&repo)]);
    assert_eq!((code, out.starts_with("MAILDIR-BACKUP CRITICAL: no backups in")), (2, true), "{out}");

    for user in ["alice", "bob"] {
        let src = maildir(&t.path().join(user), 5);
        cli_ok(&["backup", "-q", "--repo", s(&repo), "--name", user, s(&src)]);
    }
    let (code, out) = check(&[s(&repo)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("MAILDIR-BACKUP OK: 2 users, newest snapshots "), "{out}");
    assert!(out.contains(" old, all verify (sizes) | users=2 warning=0 critical=0 oldest_snapshot_age="), "{out}");
    assert!(out.contains(";;93600;0; messages=20;;;0; bytes="), "{out}");
    assert_eq!(out.lines().count(), 1, "one status line: {out}");

    let (code, out) = check(&[s(&repo), "--name", "alice", "--name", "carol"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("carol: never backed up") && out.contains("users=2 warning=0 critical=1"), "{out}");

    // A run that fails is recorded, though nothing was published.
    let r = cli(&["backup", "-q", "--repo", s(&repo), "--name", "bob", s(&t.path().join("nowhere"))]);
    assert_eq!(r.code(), Some(EX_NOINPUT), "{}", r.show());
    let record: serde_json::Value = serde_json::from_slice(&fs::read(repo.join("bob/last-run.json")).unwrap()).unwrap();
    assert_eq!((record["ok"].as_bool(), record["exit_code"].as_i64(), record["failures_in_a_row"].as_u64()), (Some(false), Some(66), Some(1)));
    assert!(record["last_success"].as_i64().is_some(), "{record}");
    let (code, out) = check(&[s(&repo), "-v"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("MAILDIR-BACKUP WARNING: bob: last run failed at ") && out.contains("(exit 66): "), "{out}");
    assert!(out.lines().any(|l| l.starts_with("alice OK: newest snapshot")) && out.lines().any(|l| l.starts_with("bob WARNING: ")), "{out}");

    // alice's newest snapshot made old: critical past --max-age, a warning past --warn-age only.
    let snap = snapshot_of(&repo, "alice");
    let old = snap.with_file_name("2026-01-01T000000Z");
    fs::rename(&snap, &old).unwrap();
    let (code, out) = check(&[s(&repo), "--name", "alice"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("alice: newest snapshot 2026-01-01T000000Z is ") && out.contains("(critical over 1day 2h)"), "{out}");
    let (code, out) = check(&[s(&repo), "--name", "alice", "--max-age", "100000days", "--warn-age", "1day"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(warning over 1day)"), "{out}");

    // bob's snapshot damaged: a truncated message fails the quick check.
    let bob = snapshot_of(&repo, "bob");
    let msg = fs::read_dir(bob.join("cur")).unwrap().next().unwrap().unwrap().path();
    let body = fs::read(&msg).unwrap();
    fs::write(&msg, &body[..body.len() - 1]).unwrap();
    let (code, out) = check(&[s(&repo), "--name", "bob"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("does not verify (1 problem(s))") && out.contains("manifest says"), "{out}");
    // Same size, other bytes: only --deep reads them.
    let mut flipped = body.clone();
    flipped[0] ^= 0x20;
    fs::write(&msg, &flipped).unwrap();
    let (code, out) = check(&[s(&repo), "--name", "bob", "--max-age", "1000days"]);
    assert_eq!(code, 1, "a failed last run, nothing else: {out}");
    let (code, out) = check(&[s(&repo), "--name", "bob", "--deep"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("checksum differs"), "{out}");

    // Monitoring plugins answer bad usage with UNKNOWN.
    let (code, _) = check(&[s(&repo), "--max-age", "soon"]);
    assert_eq!(code, 3);
}

#[test]
fn metrics_file_keeps_every_user_and_parses_strictly() {
    let t = tempdir();
    let (repo, file) = (t.path().join("repo"), t.path().join("prom/maildir-backup.prom"));
    fs::create_dir(t.path().join("prom")).unwrap();
    let alice = maildir(&t.path().join("alice"), 4);
    let odd = "o\"dd\\user";
    let mut reports = Vec::new();
    for (user, src) in [("alice", &alice), (odd, &alice)] {
        let r = cli_ok(&["backup", "--json", "--repo", s(&repo), "--name", user, "--metrics", s(&file), s(src)]);
        reports.push(r.json());
    }
    let m = promtext::read(&file);
    assert_eq!(user_value(&m, "maildir_backup_messages", "alice"), reports[0]["messages"].as_f64().unwrap());
    assert_eq!(user_value(&m, "maildir_backup_bytes", "alice"), reports[0]["bytes"].as_f64().unwrap());
    // The same duration, in seconds there and milliseconds here: equal up to rounding.
    let (held, reported) = (user_value(&m, "maildir_backup_lock_hold_seconds", "alice"), reports[0]["lock_hold_ms"].as_f64().unwrap() / 1000.0);
    assert!(held > 0.0 && (held - reported).abs() <= reported * 1e-9, "{held} s vs {reported} s");
    assert_eq!(user_value(&m, "maildir_backup_last_run_success", odd), 1.0);
    let succeeded = user_value(&m, "maildir_backup_last_success_timestamp_seconds", "alice");

    // A failure: the last success and its counts stay, the failure is counted.
    let r = cli(&["backup", "-q", "--name", "alice", "--metrics", s(&file), s(&t.path().join("gone")), s(&t.path().join("out"))]);
    assert_eq!(r.code(), Some(EX_NOINPUT));
    let m = promtext::read(&file);
    assert_eq!(user_value(&m, "maildir_backup_last_run_success", "alice"), 0.0);
    assert_eq!(user_value(&m, "maildir_backup_last_run_exit_code", "alice"), 66.0);
    assert_eq!(user_value(&m, "maildir_backup_failures_total", "alice"), 1.0);
    assert_eq!(user_value(&m, "maildir_backup_failures_total", odd), 0.0);
    assert_eq!(user_value(&m, "maildir_backup_last_success_timestamp_seconds", "alice"), succeeded);
    assert_eq!(user_value(&m, "maildir_backup_messages", "alice"), reports[0]["messages"].as_f64().unwrap());

    // Eight users finishing together: none is lost.
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let children: Vec<_> = users
        .iter()
        .map(|u| {
            let src = maildir(&t.path().join(u), 3);
            std::process::Command::new(cli_bin())
                .args(["backup", "-q", "--metrics", s(&file), "--name", u, s(&src), s(&t.path().join(format!("{u}.out")))])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let m = promtext::read(&file);
    for u in users.iter().map(String::as_str).chain(["alice", odd]) {
        assert!(user_value(&m, "maildir_backup_last_run_timestamp_seconds", u) > 0.0, "{u}");
    }
    assert_eq!(fs::read_dir(t.path().join("prom")).unwrap().count(), 1, "no temporary file left beside the metrics");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o644);
}

#[test]
fn the_test_parser_is_strict() {
    assert!(promtext::parse("# TYPE a gauge\na{u=\"x\\\"y\"} 1\na{u=\"z\"} 2.5e3\n").is_ok());
    for bad in ["a 1", "a{u=\"x\"} 1\nb 2\na{u=\"y\"} 3\n", "a 1\na 2\n", "a{u=\"x\\q\"} 1\n", "a{u=x} 1\n", "a\n", "# TYPE a gauge\n# TYPE a gauge\n", "a 1\n# TYPE a gauge\n", "1a 2\n", "a{u=\"x\"}1\n"] {
        assert!(promtext::parse(bad).is_err(), "accepted {bad:?}");
    }
}
