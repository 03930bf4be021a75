//! `doveadm maildir-backup` across a Dovecot cluster (tests/support/cluster.rs): backends with their own
//! users and repositories, a proxy routing each user to its backend, doveadm servers over TCP and the
//! HTTP API; and `maildir-backup all-users`, the nightly run over all of it that always finishes.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::churn::{imap_churn, presence_problems, Churn, Tracker};
use support::cluster::*;
use support::plugin::run_plugin;
use support::readback::*;
use support::*;

const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every backend's users populated with `FOLDERS` × `n` messages.
fn populated<R: ClusterRelease>(c: &Cluster<R>, n: usize) {
    for b in &c.backends {
        for u in &b.users {
            populate(&b.dovecot, u, FOLDERS, n);
        }
    }
}

/// The series (users) in a repository, and each one's snapshots, oldest first.
fn repo_contents(repo: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(repo).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.file_type().unwrap().is_dir() {
            continue;
        }
        let mut snaps: Vec<PathBuf> =
            fs::read_dir(e.path()).unwrap().flatten().filter(|s| maildir_backup::repo::parse_time(&s.file_name().to_string_lossy()).is_some()).map(|s| s.path()).collect();
        snaps.sort();
        out.insert(name, snaps);
    }
    out
}

/// Users in `all-users`' rows (its `-f tab` table on stdout).
fn users_in_rows(r: &Run) -> BTreeSet<String> {
    let mut lines = r.stdout.lines();
    let header: Vec<&str> = lines.next().map(|h| h.split('\t').collect()).unwrap_or_default();
    assert_eq!(header.first(), Some(&"user"), "{}", r.show());
    lines.map(|l| l.split('\t').next().unwrap().to_string()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------------------
// all-users through the proxy

/// The documented nightly command on the proxy, 20 times in a row while IMAP sessions change, move,
/// append and expunge mail of a user on each backend: every run finishes with every user backed up
/// (none stopped at its time limit), each backend's repository holds exactly its own users, every
/// snapshot verifies, and none lost a message that existed before its run and was not expunged during it.
fn all_users_under_churn_twenty_times<R: ClusterRelease>() {
    let c = Cluster::<R>::start(&[&["alice", "bob"], &["carol", "dave"]], None);
    populated(&c, 30);
    let churned = ["alice", "carol"];
    let (mut trackers, mut churns) = (Vec::new(), Vec::new());
    for user in churned {
        let b = c.backend_of(user);
        let tracker = Tracker::new();
        assert_eq!(tracker.register_existing(&b.dovecot.maildir(user)), 90);
        let mut o = imap_churn(&b.dovecot, FOLDERS, 2);
        o.user = user.to_string();
        churns.push(Churn::start(o, tracker.clone()));
        trackers.push(tracker);
    }
    for ch in &churns {
        ch.wait_ops(20, Duration::from_secs(30));
    }
    let mut ticks = Vec::new();
    for _ in 0..20 {
        let start: Vec<u64> = trackers.iter().map(|t| t.tick()).collect();
        let r = c.all_users(&["-j", "4", "--user-timeout", "2m"], &["maildir-backup", "-t", "60"]);
        let end: Vec<u64> = trackers.iter().map(|t| t.tick()).collect();
        r.expect_ok().expect_stderr(&["4 ok, 0 failed, 0 timed out"]);
        assert_eq!(users_in_rows(&r), set(&["alice", "bob", "carol", "dave"]), "{}", r.show());
        ticks.push((start, end));
    }
    for ch in churns {
        let stats = ch.stop();
        assert!(stats.moves > 0 && stats.flag_changes > 0 && stats.appends > 0 && stats.expunges > 0, "churn did too little: {stats:?}");
    }
    for b in &c.backends {
        let got = repo_contents(&b.repo);
        assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), b.users.iter().cloned().collect(), "{}", b.repo.display());
        for (user, snaps) in &got {
            assert_eq!(snaps.len(), 20, "{user}: {snaps:?}");
            snaps.iter().for_each(|s| drop(assert_verified(s)));
        }
    }
    for (k, user) in churned.iter().enumerate() {
        let snaps = &repo_contents(&c.backend_of(user).repo)[*user];
        for (snap, (start, end)) in snaps.iter().zip(&ticks) {
            assert_no_problems(&format!("{}: presence", snap.display()), &presence_problems(&trackers[k], snap, start[k], end[k]));
        }
    }
}

#[test]
fn all_users_under_churn_twenty_times_on_2_3() {
    all_users_under_churn_twenty_times::<V23>();
}

/// The nightly run over a cluster: each backend's repository gets exactly its own users; with a backend
/// down, its user fails with the reason (the connection refused) while the users before and after it in
/// the list are still backed up; `-F` names the users instead of the userdb. The first run is the
/// README's nightly command.
fn all_users_go_on_past_a_backend_that_is_down<R: ClusterRelease>() {
    let mut c = Cluster::<R>::start(&[&["alice", "bob"], &["carol"]], Some(&["alice", "carol", "bob"]));
    populated(&c, 5);
    let r = c.readme_all_users();
    r.expect_ok();
    assert_eq!(users_in_rows(&r), set(&["alice", "bob", "carol"]), "{}", r.show());
    r.expect_stderr(&["3 users in", "3 ok, 0 failed, 0 timed out"]);
    for b in &c.backends {
        let got = repo_contents(&b.repo);
        assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), b.users.iter().cloned().collect(), "{}", b.repo.display());
        for snaps in got.values() {
            assert_eq!(snaps.len(), 1);
            assert_verified(&snaps[0]);
        }
    }

    // Restores run the same way: the README's dry run for everyone.
    assert!(readme().contains("maildir-backup all-users -- maildir-backup-restore -n\nrepo:/var/backups/maildir-backup"));
    for b in &c.backends {
        let r = c.all_users(&["-u", &b.users[0]], &["maildir-backup-restore", "-n", &format!("repo:{}", R::inside(&b.repo).display())]);
        r.expect_ok();
        assert!(r.stdout.lines().nth(1).is_some_and(|row| row.starts_with(&format!("{}\t", b.users[0])) && row.ends_with("\tdry run")), "{}", r.show());
    }

    c.backends[1].dovecot.stop();
    let r = c.all_users(&["-j", "1"], &["maildir-backup"]);
    r.expect_code(EX_TEMPFAIL);
    let carol_line = r.stderr.lines().find(|l| l.starts_with("maildir-backup all-users: carol: ")).unwrap_or_else(|| panic!("no error for carol\n{}", r.show()));
    assert!(carol_line.contains(&c.backends[1].doveadm_server()) && carol_line.contains("Connection refused"), "{carol_line}");
    r.expect_stderr(&["3 users in", "2 ok, 1 failed, 0 timed out"]);
    assert_eq!(users_in_rows(&r), set(&["alice", "bob"]), "{}", r.show());
    let on_first = repo_contents(&c.backends[0].repo);
    assert!(on_first.values().all(|snaps| snaps.len() == 2), "{on_first:?}");

    let users = vmail_tempdir();
    let file = users.path().join("users");
    fs::write(&file, "bob\ncarol\n").unwrap();
    let r = c.all_users(&["-F", s(&file)], &["maildir-backup"]);
    r.expect_code(EX_TEMPFAIL);
    assert_eq!(users_in_rows(&r), set(&["bob"]), "{}", r.show());
    r.expect_stderr(&["maildir-backup all-users: carol: ", "2 users in", "1 ok, 1 failed"]);
    assert_eq!(repo_contents(&c.backends[0].repo)["bob"].len(), 3);
}

#[test]
fn all_users_go_on_past_a_backend_that_is_down_on_2_3() {
    all_users_go_on_past_a_backend_that_is_down::<V23>();
}

// ---------------------------------------------------------------------------------------------------------
// doveadm -S

/// `doveadm -S backend` runs the command in the backend's doveadm server: every option travels and has
/// the effect it has locally (the same folders, messages and index files, the same rows); a wrong
/// doveadm password is refused with nothing written; a relative destination is refused there (its
/// directory would be Dovecot's base_dir), and the reason reaches the caller.
fn doveadm_s_has_the_local_effect<R: ClusterRelease>() {
    let c = Cluster::<R>::start(&[&["alice"]], None);
    populated(&c, 8);
    let b = &c.backends[0];
    let out = R::tempdir();
    R::chown_vmail(out.path());
    let (local, remote) = (out.path().join("local"), out.path().join("remote"));
    // doveadm's own options first, then the command's (`-S` is one of them), then ours.
    let run = |global: &[&str], server: &[&str], dest: &Path| {
        let dest = R::inside(dest).display().to_string();
        let ours = ["-u", "alice", "-m", "INBOX", "-m", "Sent", "-t", "30", "-j", "2", "-i", &dest];
        let all: Vec<&str> = ["-f", "json"].iter().chain(global).chain(&["maildir-backup"]).chain(server).chain(&ours).copied().collect();
        run_plugin(&b.dovecot, &all)
    };
    let here = run(&[], &[], &local);
    here.expect_ok();
    let server = b.doveadm_server();
    let there = run(&[], &["-S", &server], &remote);
    there.expect_ok();
    let rows = |r: &Run| r.json_rows().into_iter().map(|mut row| { row.remove("lock_ms"); row }).collect::<Vec<_>>();
    assert_eq!(rows(&here), rows(&there));
    assert_eq!(rows(&there).len(), 2, "{}", there.show());
    for dest in [&local, &remote] {
        assert_verified(dest);
    }
    let (l, r) = (read_manifest(&local), read_manifest(&remote));
    assert_eq!(l.folders.iter().map(|f| &f.name).collect::<Vec<_>>(), r.folders.iter().map(|f| &f.name).collect::<Vec<_>>());
    assert_eq!(l.messages.iter().map(|m| &m.unique).collect::<BTreeSet<_>>(), r.messages.iter().map(|m| &m.unique).collect::<BTreeSet<_>>());
    let indexes = |d: &Path| fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("dovecot.index")).collect::<BTreeSet<_>>();
    assert!(!indexes(&local).is_empty(), "-i copied no index files");
    assert_eq!(indexes(&local), indexes(&remote));

    let wrong = out.path().join("wrong");
    let r = run(&["-o", "doveadm_password=not-the-password"], &["-S", &server], &wrong);
    r.expect_code(EX_TEMPFAIL);
    assert!(fs::symlink_metadata(&wrong).is_err(), "a refused run wrote {}", wrong.display());

    let r = run_plugin(&b.dovecot, &["maildir-backup", "-S", &server, "-u", "alice", "relative/dest"]);
    r.expect_code(EX_USAGE).expect_stderr(&["relative path relative/dest", "give an absolute path"]);
}

#[test]
fn doveadm_s_has_the_local_effect_on_2_3() {
    doveadm_s_has_the_local_effect::<V23>();
}

// ---------------------------------------------------------------------------------------------------------
// The HTTP API

/// The doveadm HTTP API on a backend: `maildirBackup` and `maildirBackupRestore` with their parameters
/// in camelCase answer with the command's rows, and so does the proxy's, routing the user to the
/// backend; no API key or a wrong one gets 401; a failed backup's reason comes with
/// `maildirBackupStatus`.
fn http_api_runs_backup_and_restore<R: ClusterRelease>() {
    let c = Cluster::<R>::start(&[&["alice"]], None);
    populated(&c, 6);
    let b = &c.backends[0];
    // The README's call first, as written but for the address and the repository.
    let r = readme_curl(b.address, &R::inside(&b.repo));
    r.expect_ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.show()));
    assert_eq!((&v[0][0], &v[0][1][0]["mailbox"], &v[0][1][0]["status"]), (&"doveadmResponse".into(), &"INBOX".into(), &"ok".into()), "{}", r.show());
    fs::remove_dir_all(b.repo.join("alice")).unwrap();

    let auth = api_key_auth(API_KEY);
    let repo = format!("repo:{}", R::inside(&b.repo).display());
    let body = serde_json::json!([["maildirBackup", {"user": "alice", "mailbox": ["INBOX", "Sent"], "lockTimeout": "30", "jobs": 2, "withIndexes": true, "destination": repo}, "b1"]]);
    let (code, text) = http_post(&b.http_url(), Some(&auth), &body.to_string());
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!((&v[0][0], &v[0][2]), (&serde_json::json!("doveadmResponse"), &serde_json::json!("b1")), "{text}");
    let rows: BTreeMap<String, String> = v[0][1].as_array().unwrap().iter().map(|r| (r["mailbox"].as_str().unwrap().to_string(), r["status"].as_str().unwrap().to_string())).collect();
    assert_eq!(rows, BTreeMap::from([("INBOX".into(), "ok".into()), ("Sent".into(), "ok".into())]), "{text}");
    let snaps = &repo_contents(&b.repo)["alice"];
    assert_eq!(snaps.len(), 1);
    assert_verified(&snaps[0]);
    let inbox = read_manifest(&snaps[0]).messages.iter().filter(|m| m.folder.is_empty()).count();
    assert_eq!(inbox, 6);

    let body = serde_json::json!([["maildirBackupRestore", {"user": "alice", "folder": ["INBOX"], "dryRun": true, "snapshot": repo}, "r1"]]);
    let (code, text) = http_post(&b.http_url(), Some(&auth), &body.to_string());
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let row = &v[0][1][0];
    assert_eq!((row["user"].as_str(), row["status"].as_str()), (Some("alice"), Some("dry run")), "{text}");

    // Through the proxy's HTTP API: routed to the backend, which takes its own destination setting.
    let proxy_url = format!("http://{}:{HTTP_PORT}/doveadm/v1", c.proxy_address);
    let body = serde_json::json!([["maildirBackup", {"user": "alice", "mailbox": ["Sent"]}, "p1"]]);
    let (code, text) = http_post(&proxy_url, Some(&auth), &body.to_string());
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(r#""mailbox":"Sent""#) && text.contains(r#""status":"ok""#), "{text}");
    assert_eq!(repo_contents(&b.repo)["alice"].len(), 2, "the proxy's request made no snapshot on the backend");

    let body = serde_json::json!([["maildirBackupRestore", {"user": "alice", "folder": ["INBOX"], "dryRun": true, "snapshot": repo}, "r1"]]);
    for auth in [None, Some(api_key_auth("not-the-key"))] {
        let (code, text) = http_post(&b.http_url(), auth.as_deref(), &body.to_string());
        assert_eq!(code, 401, "{auth:?}: {text}");
    }
    // A failure is an exit code in the response (Dovecot's HTTP API carries no message).
    let body = serde_json::json!([["maildirBackup", {"user": "alice", "destination": "relative/dest"}, "e1"]]);
    let (code, text) = http_post(&b.http_url(), Some(&api_key_auth(API_KEY)), &body.to_string());
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v[0][0], "error", "{text}");
    assert_eq!(v[0][1]["exitCode"], EX_USAGE, "{text}");

    // The reason comes with maildirBackupStatus in the same request: a backup that cannot take the
    // INBOX's lock (held by someone else) fails, and the status row says why.
    let held = fake_uidlist_lock(&b.dovecot.maildir("alice"));
    let body = serde_json::json!([
        ["maildirBackup", {"user": "alice", "lockTimeout": "1", "destination": repo}, "b2"],
        ["maildirBackupStatus", {"user": "alice", "repository": repo}, "s2"],
    ]);
    let (code, text) = http_post(&proxy_url, Some(&api_key_auth(API_KEY)), &body.to_string());
    held.release();
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((&v[0][0], &v[0][1]["exitCode"]), (&"error".into(), &EX_TEMPFAIL.into()), "{text}");
    let status = &v[1][1][0];
    assert_eq!((&v[1][0], &status["result"], &status["exit_code"]), (&"doveadmResponse".into(), &"failed".into(), &"75".into()), "{text}");
    assert!(status["error"].as_str().is_some_and(|e| e.contains("lock")), "{text}");
    // And after a good run, what it made.
    let body = serde_json::json!([["maildirBackup", {"user": "alice", "destination": repo}, "b3"], ["maildirBackupStatus", {"user": "alice", "repository": repo}, "s3"]]);
    let (_, text) = http_post(&b.http_url(), Some(&api_key_auth(API_KEY)), &body.to_string());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let newest = repo_contents(&b.repo)["alice"].last().unwrap().file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!((&v[1][1][0]["result"], &v[1][1][0]["snapshot"], &v[1][1][0]["error"]), (&"ok".into(), &newest.into(), &"-".into()), "{text}");
}

#[test]
fn http_api_runs_backup_and_restore_on_2_3() {
    http_api_runs_backup_and_restore::<V23>();
}

// ---------------------------------------------------------------------------------------------------------
// Dovecot 2.4

#[test]
fn d24_all_users_under_churn_twenty_times() {
    all_users_under_churn_twenty_times::<V24>();
}

#[test]
fn d24_all_users_go_on_past_a_backend_that_is_down() {
    all_users_go_on_past_a_backend_that_is_down::<V24>();
}

#[test]
fn d24_doveadm_s_has_the_local_effect() {
    doveadm_s_has_the_local_effect::<V24>();
}

#[test]
fn d24_http_api_runs_backup_and_restore() {
    http_api_runs_backup_and_restore::<V24>();
}
