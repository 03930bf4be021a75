//! maildir-backup against a real **Dovecot 2.4.1** (a Debian 13 root, tests/support/dovecot24.rs); every test
//! starts its own instance. The 2.3 counterparts are tests/lock_dovecot.rs, tests/backup_live.rs,
//! tests/plugin.rs, tests/plugin_repo.rs and tests/repo.rs.
//!
//! 1. Locks: our `lock` and `maildirlock` make a 2.4 IMAP SELECT wait; a lock that 2.4's own imap process
//!    made and holds (LD_PRELOAD pause, as in lock_dovecot.rs) makes our `lock --timeout 2` exit 75.
//! 2. CLI backups (2.4 terms: `--mail-path/--control-path/--index-path`) under IMAP churn: nothing lost,
//!    nothing from tmp/, `verify` whole, 2.4 reads each backup with its uidlist's UIDs and its names' flags,
//!    and a backup after the churn equals the source.
//! 3. The plugin built against 2.4 headers in 2.4's doveadm: `-u` under churn; `-A` over users whose
//!    control/index split and fs layout come only from dovecot.conf and the userdb; `-f json`; the
//!    `maildir_backup_*` settings from dovecot.conf and `-o`; lock timeouts (exit 75).
//! 4. Restores read back by 2.4: a full restore into a new user (UIDs, UIDVALIDITY, flags, keywords), and the
//!    plugin's `maildir-backup-restore` merging expunged messages back (and, run again, adding nothing).
//! 5. Cross-release: the 2.3 build in 2.4's doveadm and the 2.4 build in 2.3's doveadm are refused, and
//!    doveadm keeps working.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::churn::{self, Churn, ChurnOptions, Tracker};
use support::dovecot24::{chown_vmail_recursive_root, tempdir_in_root};
use support::plugin24::*;
use support::plugin_users::{assert_verified, read_manifest, vmail_tempdir, LockHolder};
use support::repo_helpers::{mid_flags, take_snapshot};
use support::procs::{build_hold_shim, files_in, host, mb, run_maildirlock, secs, spawn, wait_until};
use support::*;

const LOCK: &str = "dovecot-uidlist.lock";

// ---------------------------------------------------------------------------------------------------------
// helpers

/// A chroot path as a string (for doveadm arguments).
fn cp(host_path: &Path) -> String {
    host_to_root(host_path).display().to_string()
}

fn assert_no_dovecot_errors(d: &Dovecot24) {
    let log = fs::read_to_string(d.dir().join("dovecot.log")).unwrap_or_default();
    for bad in ["Panic:", "Fatal:", "Error:"] {
        assert!(!log.contains(bad), "dovecot 2.4 log has {bad}\n{}", d.log_tail());
    }
}

fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// Writes a message file straight into `mail_dir/new/` (host side, owned by vmail), as a delivery agent
/// would: it has no UID yet, so the next SELECT must sync, i.e. take the uidlist lock.
fn drop_into_new(mail_dir: &Path, n: usize) -> PathBuf {
    let p = mail_dir.join("new").join(format!("1700000000.M{n}P4242.d24test"));
    fs::write(&p, message(900 + n, 300)).unwrap();
    chown_vmail_recursive_root(&p);
    p
}

/// Creates `mailbox` (unless INBOX) and appends one message with IMAP, then drops one more file into its
/// new/ (see [`drop_into_new`]); returns `(mail dir, control dir)` as host paths.
fn prepare_mailbox(d: &Dovecot24, mailbox: &str, n: usize) -> (PathBuf, PathBuf) {
    let mut imap = d.imap("alice");
    if mailbox != "INBOX" {
        imap.create(mailbox).unwrap_or_else(|e| panic!("CREATE {mailbox}: {e}"));
    }
    imap.append(mailbox, "", &message(n, 300)).unwrap_or_else(|e| panic!("APPEND: {e}\n{}", d.log_tail()));
    imap.logout();
    let control = d.mailbox_path("alice", mailbox, "control");
    let mail = d.mailbox_path("alice", mailbox, "mailbox");
    assert!(control.join("dovecot-uidlist").exists(), "no uidlist in {}: {:?}", control.display(), files_in(&control));
    drop_into_new(&mail, n);
    (mail, control)
}

fn start_select(d: &Dovecot24, mailbox: &str) -> (Imap, String) {
    let mut imap = d.imap("alice");
    let tag = imap.send_raw(&format!("SELECT {}", imap_quote(mailbox)));
    (imap, tag)
}

/// Message-ID → files, with duplicates allowed only for messages a UID MOVE was moving during the backup.
fn check_presence(tracker: &Tracker, backup: &Path, start: u64, end: u64) -> Vec<String> {
    let ids = churn::scan_message_ids(backup);
    let required = tracker.required(start, end);
    let mut problems = Vec::new();
    let missing: Vec<&String> = required.iter().filter(|m| !ids.contains_key(*m)).collect();
    if !missing.is_empty() {
        problems.push(format!("{} of {} required messages missing, e.g. {:?}", missing.len(), required.len(), &missing[..missing.len().min(5)]));
    }
    for (mid, paths) in &ids {
        if !tracker.is_known(mid) {
            problems.push(format!("unknown message {mid} at {paths:?}"));
        }
        // A message whose UID MOVE was in flight may be in both folders (Dovecot links it into the target
        // before it unlinks the source); any other copy is a duplicate.
        if paths.len() > 1 && !(paths.len() == 2 && tracker.moved_between(mid, start, end)) {
            problems.push(format!("{mid} is in the backup {} times: {paths:?}", paths.len()));
        }
    }
    problems
}

fn churn_options(d: &Dovecot24, folders: &[&str], workers: usize) -> ChurnOptions {
    ChurnOptions {
        port: d.port(),
        // Only used by the dovecot-lda thread, which needs the 2.3 host binary: off for 2.4.
        conf: d.conf().to_path_buf(),
        user: "alice".into(),
        folders: folders.iter().map(|f| f.to_string()).collect(),
        imap_workers: workers,
        lda: false,
        pace: Duration::from_millis(2),
        lda_pace: Duration::from_millis(30),
        folder_worker: false,
    }
}

// ---------------------------------------------------------------------------------------------------------
// 1. Locks

/// Our `lock DIR -- CMD` and `maildirlock DIR 5` hold a lock that Dovecot 2.4's imap honours: a SELECT that
/// must assign a UID (a file dropped into new/) waits until we release, then completes. Control dirs are
/// split out (`mail_control_path`) and dotlocks use link() (`dotlock_use_excl = no`).
#[test]
fn d24_our_lock_and_maildirlock_make_select_wait() {
    let t0 = Instant::now();
    let d = Dovecot24::start(DovecotOptions { control: true, excl: false, ..Default::default() });
    let (_, control) = prepare_mailbox(&d, "Archive", 1);
    assert!(control.starts_with(d.control_root("alice")), "{}", control.display());
    let lock = control.join(LOCK);
    let out = tempdir();
    let inside = out.path().join("inside");
    let release = out.path().join("release");

    // `maildir-backup lock CONTROL -- sh -c '…wait for release…'`
    let mut cmd = mb();
    cmd.arg("lock").arg(&control).arg("--").args([
        "sh",
        "-c",
        r#"touch "$1"; while [ ! -e "$2" ]; do sleep 0.05; done"#,
        "sh",
        inside.to_str().unwrap(),
        release.to_str().unwrap(),
    ]);
    let holder = spawn(cmd);
    assert!(wait_until(secs(10.0), || inside.exists()), "holder did not get the lock");
    let ours = format!("{}:{}", holder.pid(), host());
    assert_eq!(fs::read_to_string(&lock).unwrap(), ours);

    let (mut imap, tag) = start_select(&d, "Archive");
    let blocked = imap.poll_tagged(&tag, secs(2.5));
    let still_ours = fs::read_to_string(&lock).ok();
    fs::write(&release, "").unwrap();
    assert!(blocked.is_none(), "2.4 SELECT completed while we held the lock: {blocked:?}");
    assert_eq!(still_ours.as_ref(), Some(&ours), "Dovecot 2.4 took our lock away");
    let h = holder.wait(secs(10.0));
    assert_eq!(h.code(), Some(0), "{}", h.show());
    assert!(h.stderr.is_empty(), "holder warned: {}", h.show());
    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT still blocked 10 s after our release");
    let lines = r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(lines.iter().any(|l| l.ends_with("2 EXISTS")), "{lines:?}");
    assert!(wait_until(secs(5.0), || !lock.exists()), "a lock is left");
    imap.logout();

    // pid=$(maildir-backup maildirlock CONTROL 5) — the replacement for the tool 2.4 removed.
    let (_, control) = prepare_mailbox(&d, "INBOX", 2);
    assert_eq!(control, d.control_root("alice").join(".INBOX"));
    let lock = control.join(LOCK);
    let errs = tempdir();
    let (status, pid) = run_maildirlock(&control, "5", &errs.path().join("err"));
    assert!(status.success(), "{}", fs::read_to_string(errs.path().join("err")).unwrap());
    let pid: i32 = pid.trim().parse().unwrap_or_else(|_| panic!("not a pid: {pid:?}"));
    assert_eq!(fs::read_to_string(&lock).unwrap(), format!("{pid}:{}", host()));
    let (mut imap, tag) = start_select(&d, "INBOX");
    let blocked = imap.poll_tagged(&tag, secs(2.5));
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert!(blocked.is_none(), "2.4 SELECT completed while maildirlock held the lock: {blocked:?}");
    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT still blocked after kill -TERM");
    r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(wait_until(secs(5.0), || !lock.exists()), "maildirlock left its lock");
    assert_eq!(fs::read_to_string(errs.path().join("err")).unwrap(), "");
    imap.logout();
    assert_no_dovecot_errors(&d);
    eprintln!("d24_our_lock_and_maildirlock_make_select_wait: {:.1?}", t0.elapsed());
}

/// While Dovecot 2.4's own imap process holds the uidlist lock it made (`<its pid>:<host>`, paused by the
/// hold shim in the middle of a SELECT), `maildir-backup lock --timeout 2` gives up with 75 naming that pid
/// and leaves the lock alone; once Dovecot is done, our lock succeeds.
#[test]
fn d24_lock_held_by_dovecot_times_out_75() {
    let t0 = Instant::now();
    let shim = tempdir_in_root();
    let (so, ctl) = build_hold_shim(shim.path()); // support::procs::HOLD_SHIM
    // 2.4: import_environment is a strlist (2.3: a space-separated string); entries add to the defaults.
    let d = Dovecot24::start(DovecotOptions {
        extra_conf: format!("import_environment {{\n  LD_PRELOAD = {}\n  MB_HOLD_DIR = {}\n}}\n", cp(&so), cp(&ctl)),
        ..Default::default()
    });
    let (_, control) = prepare_mailbox(&d, "INBOX", 1);
    let lock = control.join(LOCK);
    let ran = shim.path().join("ran");

    fs::write(ctl.join("arm"), "").unwrap();
    let (mut imap, tag) = start_select(&d, "INBOX");
    let mut dpid: Option<i32> = None;
    wait_until(secs(10.0), || {
        dpid = files_in(&ctl).iter().find_map(|n| n.strip_prefix("held.").and_then(|p| p.parse().ok()));
        dpid.is_some()
    });
    let release = || {
        let _ = fs::write(ctl.join("release"), "");
    };
    let Some(dpid) = dpid else {
        release();
        panic!("no Dovecot 2.4 process took the uidlist lock (is the shim loaded?)\n{}", d.log_tail())
    };
    let comm = fs::read_to_string(format!("/proc/{dpid}/comm")).unwrap_or_default();
    let content = fs::read_to_string(&lock).expect("Dovecot's lock file");
    let ino = fs::metadata(&lock).unwrap().ino();
    let mut cmd = mb();
    cmd.arg("lock").args(["--timeout", "2"]).arg(&control).arg("--").arg("touch").arg(&ran);
    let done = Run::of(cmd);
    let after = (fs::read_to_string(&lock).ok(), fs::metadata(&lock).map(|m| m.ino()).ok());
    let select_done_early = imap.poll_tagged(&tag, secs(0.1)).is_some();
    release();
    assert_eq!(comm.trim(), "imap", "the lock holder should be Dovecot's imap process");
    assert_eq!(content, format!("{dpid}:{}", host()), "Dovecot 2.4's lock format");
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());
    assert!(done.elapsed >= secs(1.9) && done.elapsed < secs(15.0), "{}", done.show());
    assert!(done.stderr.contains(&format!("pid {dpid}")), "message should name Dovecot's pid: {}", done.show());
    assert!(!ran.exists(), "our command ran while Dovecot held the lock");
    assert_eq!(after, (Some(content.clone()), Some(ino)), "Dovecot's lock was broken or replaced");
    assert!(!select_done_early, "SELECT finished while its process was paused?");

    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT did not complete after the hold");
    r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(wait_until(secs(5.0), || !lock.exists()), "Dovecot did not remove its lock");
    let mut cmd = mb();
    cmd.arg("lock").args(["--timeout", "5"]).arg(&control).arg("--").arg("touch").arg(&ran);
    let done = Run::of(cmd);
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(ran.exists());
    imap.logout();
    assert_no_dovecot_errors(&d);
    eprintln!("d24_lock_held_by_dovecot_times_out_75: {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------------------
// 2. CLI backups under churn

const CHURN_FOLDERS: &[&str] = &["INBOX", "Work", "Lists", "Archive"];

/// The per-folder view Dovecot must show for each backed-up folder (taken before Dovecot opens it), then
/// what Dovecot 2.4 shows, reading the backup through a 2.3-style override that the harness translates.
fn dovecot24_agrees_with_backup_files(d: &Dovecot24, user: &str, backup: &Path) -> Vec<String> {
    let manifest = read_manifest(backup);
    let expected: Vec<(String, churn::Expected)> = manifest.folders.iter().map(|f| (f.name.clone(), churn::expected_uid_flags(&backup.join(&f.path)))).collect();
    chown_vmail_recursive_root(backup);
    let loc = format!("maildir:{}:INDEX=MEMORY", backup.display());
    let mut problems = Vec::new();
    for (name, exp) in &expected {
        let got = d.fetch_uid_flags(user, name, Some(&loc));
        if let Some(diff) = churn::compare_with_expected(exp, &got) {
            problems.push(format!("{} {name}: {diff}", backup.display()));
        }
    }
    problems
}

/// Six `maildir-backup backup --mail-path … --control-path … --index-path … DEST` (the 2.4 way of naming a
/// split location) while three IMAP sessions on Dovecot 2.4 change flags (STORE + NOOP), move, append and
/// expunge; then one with the churn stopped.
#[test]
fn d24_cli_backups_under_imap_churn() {
    let t0 = Instant::now();
    let d = Dovecot24::start(DovecotOptions { control: true, extra_conf: "mail_max_userip_connections = 50\n".into(), ..Default::default() });
    d.populate("alice", CHURN_FOLDERS, 150);
    let maildir = d.maildir("alice");
    // Junk in every tmp/: half-written deliveries that must never reach a backup.
    let mut junk_ids = HashSet::new();
    for (k, f) in CHURN_FOLDERS.iter().enumerate() {
        let tmp = d.mailbox_path("alice", f, "mailbox").join("tmp");
        let id = format!("<junk.{k}@tmp.example>");
        fs::write(tmp.join(format!("1700000000.M{k}P999.junkhost,S=100")), format!("From: x@example.com\r\nMessage-ID: {id}\r\n\r\nhalf\r\n")).unwrap();
        junk_ids.insert(id);
    }
    chown_vmail_recursive_root(&maildir);
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&maildir), 600);
    let out = tempdir_in_root();
    let source_args = |dest: &Path| -> Vec<String> {
        vec![
            "backup".into(),
            "--json".into(),
            "--mail-path".into(),
            maildir.display().to_string(),
            "--control-path".into(),
            d.control_root("alice").display().to_string(),
            "--index-path".into(),
            d.index_root("alice").display().to_string(),
            dest.display().to_string(),
        ]
    };

    let churn = Churn::start(churn_options(&d, CHURN_FOLDERS, 3), tracker.clone());
    churn.wait_ops(30, Duration::from_secs(20));
    let mut runs = Vec::new();
    let mut ops_during = 0;
    for i in 0..6 {
        let dest = out.path().join(format!("b{i}"));
        let ops0 = churn.ops();
        let start = tracker.tick();
        let mut cmd = mb();
        cmd.args(source_args(&dest));
        let r = Run::of(cmd);
        let end = tracker.tick();
        ops_during += churn.ops() - ops0;
        assert_eq!(r.code(), Some(0), "{}", r.show());
        runs.push((dest, start, end));
        churn.wait_ops(20, Duration::from_secs(20));
    }
    let stats = churn.stop();
    eprintln!(
        "2.4 churn: {} flag changes, {} moves, {} appends, {} expunges; {ops_during} ops during the backups; {} errors (first: {:?})",
        stats.flag_changes,
        stats.moves,
        stats.appends,
        stats.expunges,
        stats.errors.len(),
        stats.errors.first()
    );
    assert!(stats.moves > 0 && stats.flag_changes > 0 && stats.appends > 0 && stats.expunges > 0, "churn did too little: {stats:?}");
    assert!(ops_during > 0, "no churn operation overlapped a backup");

    for (dest, start, end) in &runs {
        let mut cmd = mb();
        cmd.arg("verify").arg(dest);
        let v = Run::of(cmd);
        assert_eq!(v.code(), Some(0), "{}", v.show());
        let tmp = churn::files_under_tmp(dest);
        assert!(tmp.is_empty(), "{}: files in tmp/: {tmp:?}", dest.display());
        let ids = churn::scan_message_ids(dest);
        assert!(!ids.keys().any(|m| junk_ids.contains(m)), "{}: junk from tmp/ was copied", dest.display());
        assert_no_problems(&format!("{}: presence", dest.display()), &check_presence(&tracker, dest, *start, *end));
        let names: BTreeSet<String> = read_manifest(dest).folders.iter().map(|f| f.name.clone()).collect();
        assert_eq!(names, CHURN_FOLDERS.iter().map(|s| s.to_string()).collect(), "{}", dest.display());
        assert!(!dest.join(".INBOX").exists(), "{}: the control dir layout leaked into the backup", dest.display());
        assert_no_problems("Dovecot 2.4 reading the backup", &dovecot24_agrees_with_backup_files(&d, "alice", dest));
    }

    // Quiet now: a backup equals the source exactly, as 2.4 reads both.
    let dest = out.path().join("quiet");
    let src: BTreeMap<&str, Vec<(u32, String)>> = CHURN_FOLDERS.iter().map(|f| (*f, d.fetch_uid_flags("alice", f, None))).collect();
    let mut cmd = mb();
    cmd.args(source_args(&dest));
    let r = Run::of(cmd);
    assert_eq!(r.code(), Some(0), "{}", r.show());
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("--json output ({e}): {}", r.show()));
    assert_eq!(json["messages"].as_u64(), Some(src.values().map(|v| v.len() as u64).sum()), "{}", r.stdout);
    assert_verified(&dest);
    chown_vmail_recursive_root(&dest);
    let loc = format!("maildir:{}:INDEX=MEMORY", dest.display());
    for (f, want) in &src {
        assert!(!want.is_empty());
        assert_eq!(&d.fetch_uid_flags("alice", f, Some(&loc)), want, "{f}: backup vs source");
    }
    eprintln!("d24_cli_backups_under_imap_churn: {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------------------
// 3. The plugin in 2.4's doveadm

const PLUGIN_FOLDERS: &[&str] = &["INBOX", "Sent", "Archive.2024", "Entwürfe"];

/// `doveadm -f json maildir-backup -u alice -j 2 DEST` five times under IMAP churn: nothing lost or
/// duplicated, every backup verifies, 2.4 reads each with its own uidlist's UIDs/GUIDs and its names' flags,
/// and the JSON rows are the manifest's folders.
#[test]
fn d24_plugin_user_backups_under_churn() {
    let t0 = Instant::now();
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions { extra_conf: "mail_max_userip_connections = 50\n".into(), ..Default::default() });
    let folders = ["INBOX", "Sent", "Archive", "Archive.2024"];
    d.populate("alice", &folders, 100);
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&d.maildir("alice")), 400);
    let out = tempdir_in_root();
    vmail_dir24(out.path());

    let churn = Churn::start(churn_options(&d, &folders, 3), tracker.clone());
    churn.wait_ops(30, Duration::from_secs(20));
    let mut runs = Vec::new();
    let mut ops_during = 0;
    for i in 0..5 {
        let dest = out.path().join(format!("alice-{i}"));
        let ops0 = churn.ops();
        let start = tracker.tick();
        let r = run24(&d, &["-f", "json", "maildir-backup", "-u", "alice", "-j", "2", &cp(&dest)]);
        let end = tracker.tick();
        ops_during += churn.ops() - ops0;
        r.expect_ok();
        runs.push((dest, start, end, r));
        churn.wait_ops(20, Duration::from_secs(20));
    }
    let stats = churn.stop();
    eprintln!("2.4 plugin churn: {stats:?}, {ops_during} ops during the backups");
    assert!(stats.moves > 0 && stats.flag_changes > 0 && stats.appends > 0 && stats.expunges > 0, "churn did too little: {stats:?}");
    assert!(ops_during > 0, "no churn operation overlapped a backup");
    for (dest, start, end, r) in &runs {
        assert_verified(dest);
        assert_no_problems(&format!("{}: presence", dest.display()), &check_presence(&tracker, dest, *start, *end));
        assert_no_problems("Dovecot 2.4 reading the backup", &check_dovecot24_reads_backup(&d, "alice", dest, false));
        let manifest = read_manifest(dest);
        let printed = rows_by_user(&r.json_rows()).remove("alice").unwrap_or_default();
        let recorded: BTreeMap<String, u64> = manifest.folders.iter().map(|f| (f.name.clone(), f.messages)).collect();
        assert_eq!(printed, recorded, "{}", r.show());
    }
    eprintln!("d24_plugin_user_backups_under_churn: {:.1?}", t0.elapsed());
}

fn expunge(d: &Dovecot24, user: &str, mailbox: &str, uids: &str) {
    let mut imap = d.imap(user);
    imap.select(mailbox).unwrap();
    imap.uid_expunge(uids).unwrap();
    imap.logout();
}

/// `-A` over four users, the layout driven only by dovecot.conf and 2.4 userdb fields (setting names with a
/// `userdb_` prefix in the passwd-file's extra field): alice (the global Maildir++), bob
/// (`userdb_mail_control_path`, `userdb_mail_index_path`), carol (`userdb_mail_path` elsewhere +
/// `userdb_mailbox_list_layout=fs`) and dave (never logged in). `-f json` parses and matches each manifest;
/// each backup is self-contained and 2.4 reads the same (uid, guid, flags) from it as from the source.
#[test]
fn d24_plugin_all_users_split_dirs_and_fs_layout() {
    let t0 = Instant::now();
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions::default());
    let dir = d.dir().to_path_buf();
    let c = d.dir_in_root().display().to_string();
    vmail_dir24(&dir.join("ctl"));
    vmail_dir24(&dir.join("idx"));
    vmail_dir24(&dir.join("fsmail"));
    add_userdb_user24(&d, "bob", &format!("userdb_mail_control_path={c}/ctl/%{{user}} userdb_mail_index_path={c}/idx/%{{user}}"));
    add_userdb_user24(&d, "carol", &format!("userdb_mail_path={c}/fsmail/%{{user}} userdb_mailbox_list_layout=fs"));
    add_userdb_user24(&d, "dave", "");
    for (i, u) in ["alice", "bob", "carol"].iter().enumerate() {
        d.populate(u, PLUGIN_FOLDERS, 12 + i);
        expunge(&d, u, "Sent", "3,5:6");
    }
    // The configuration really is what it claims.
    assert!(dir.join("ctl/bob/.INBOX/dovecot-uidlist").is_file());
    assert!(dir.join("ctl/bob/.Sent/dovecot-uidlist").is_file());
    assert!(!d.maildir("bob").join("dovecot-uidlist").exists());
    assert!(!d.maildir("bob").join(".Sent/dovecot-uidlist").exists());
    assert!(dir.join("idx/bob/.INBOX/dovecot.index.log").is_file() || dir.join("idx/bob/dovecot.list.index.log").is_file());
    assert!(dir.join("fsmail/carol/Archive/2024/cur").is_dir(), "carol: no fs layout");
    assert!(dir.join("fsmail/carol/Sent/cur").is_dir());
    assert!(!d.maildir("carol").exists());

    let out = tempdir_in_root();
    vmail_dir24(out.path());
    let r = run24(&d, &["-f", "json", "maildir-backup", "-A", &format!("{}/%{{user}}", cp(out.path()))]);
    r.expect_ok();
    let rows = r.json_rows();
    let by_user = rows_by_user(&rows);
    let users: BTreeSet<&str> = by_user.keys().map(String::as_str).collect();
    assert_eq!(users, ["alice", "bob", "carol", "dave"].into_iter().collect(), "{}", r.show());
    for row in &rows {
        for k in ["user", "mailbox", "messages", "bytes", "lock_ms", "status"] {
            assert!(row.contains_key(k), "row {row:?} lacks {k}");
        }
        assert_eq!(row["status"], "ok", "{row:?}");
    }

    for (user, fs_layout, mail_root) in [
        ("alice", false, d.maildir("alice")),
        ("bob", false, d.maildir("bob")),
        ("carol", true, dir.join("fsmail/carol")),
        ("dave", false, d.maildir("dave")),
    ] {
        let b = out.path().join(user);
        assert_verified(&b);
        let m = read_manifest(&b);
        // Rows name mailboxes as Dovecot does (UTF-8 "Entwürfe"), the manifest as they are on disk
        // ("Entw&APw-rfe", "Archive/2024" in carol's fs layout): match them through the mailbox directory.
        let recorded: BTreeMap<String, u64> = m.folders.iter().map(|f| (f.path.trim_end_matches('/').to_string(), f.messages)).collect();
        let printed: BTreeMap<String, u64> = by_user[user]
            .iter()
            .map(|(vname, n)| {
                let dir = d.mailbox_path(user, vname, "mailbox");
                let rel = dir.strip_prefix(&mail_root).unwrap_or_else(|_| panic!("{user}: {} is not below {}", dir.display(), mail_root.display()));
                (rel.to_string_lossy().trim_end_matches('/').to_string(), *n)
            })
            .collect();
        assert_eq!(printed, recorded, "{user}: JSON rows (left) vs manifest folders (right), by directory\n{}", r.show());
        assert!(m.header.source.contains(&cp(&mail_root)), "{user}: manifest source {:?}", m.header.source);
        if user == "bob" {
            assert!(m.header.source.contains(&format!("{c}/ctl/bob")), "bob: manifest source {:?}", m.header.source);
        }
        // Read as alice: she has no userdb fields, so only the overrides name the backup's layout.
        assert_no_problems(&format!("{user}: source vs backup"), &compare_source_and_backup24(&d, user, "alice", &b, fs_layout));
        assert_no_problems(&format!("{user}: Dovecot 2.4 reading the backup"), &check_dovecot24_reads_backup(&d, "alice", &b, fs_layout));
    }
    // bob's control files were brought into the backup's own folders.
    let b = out.path().join("bob");
    for f in ["dovecot-uidlist", "dovecot-keywords", ".Sent/dovecot-uidlist", ".Archive.2024/dovecot-uidlist", "dovecot-uidvalidity"] {
        assert!(b.join(f).is_file(), "bob's backup lacks {f}");
    }
    assert!(!b.join(".INBOX").exists(), "bob's backup has a .INBOX control dir");
    assert!(out.path().join("carol/Archive/2024/cur").is_dir());
    assert_eq!(read_manifest(&out.path().join("dave")).header.messages, 0);
    eprintln!("d24_plugin_all_users_split_dirs_and_fs_layout: {:.1?}", t0.elapsed());
}

/// `maildir_backup_dest` (with `%{user}`), `maildir_backup_lock_timeout` (a 2.4 TIME: needs a unit),
/// `maildir_backup_jobs` and `maildir_backup_with_indexes` as top-level dovecot.conf keys; `doveadm -o`
/// overrides them and the command line wins over both; a held lock gives 75 after the configured 1 s and
/// after `-t 2`; a bad value is a configuration error (78).
#[test]
fn d24_plugin_settings_overrides_and_lock_timeout() {
    let t0 = Instant::now();
    install_plugin24();
    let out = tempdir_in_root();
    vmail_dir24(out.path());
    let conf_dest = vmail_dir24(&out.path().join("conf"));
    let d = Dovecot24::start(DovecotOptions {
        extra_conf: format!(
            "maildir_backup_dest = {}/%{{user}}\nmaildir_backup_lock_timeout = 1s\nmaildir_backup_jobs = 2\nmaildir_backup_with_indexes = yes\n",
            cp(&conf_dest)
        ),
        ..Default::default()
    });
    d.populate("alice", PLUGIN_FOLDERS, 8);

    // The command line's destination wins...
    let cli_dest = out.path().join("cli-alice");
    run24(&d, &["maildir-backup", "-u", "alice", &cp(&cli_dest)]).expect_ok();
    assert!(!conf_dest.join("alice").exists(), "the configured destination was used although one was given");
    assert_verified(&cli_dest);
    // ...without one, the configured one is used (%{user} expanded)...
    run24(&d, &["maildir-backup", "-u", "alice"]).expect_ok();
    let b = conf_dest.join("alice");
    assert_verified(&b);
    assert_no_problems("conf dest: source vs backup", &compare_source_and_backup24(&d, "alice", "alice", &b, false));
    // ...and `-o maildir_backup_dest=` overrides the configured one.
    let o_dest = vmail_dir24(&out.path().join("o"));
    run24(&d, &["-o", &format!("maildir_backup_dest={}/%{{user}}", cp(&o_dest)), "maildir-backup", "-u", "alice"]).expect_ok();
    assert_verified(&o_dest.join("alice"));
    assert_eq!(files_in(&conf_dest), ["alice"], "the -o override was not used");
    // maildir_backup_with_indexes = yes: Dovecot's index files came along.
    for bk in [&b, &cli_dest, &o_dest.join("alice")] {
        assert!(bk.join("dovecot.index.log").is_file(), "{}: no index files", bk.display());
        assert!(bk.join(".Sent/dovecot.index.log").is_file(), "{}: no .Sent index files", bk.display());
    }

    // maildir_backup_lock_timeout = 1s (the default would wait 122 s), and -t wins over it.
    let holder = LockHolder::start(&d.mailbox_path("alice", "INBOX", "control"), 30);
    let r = run24(&d, &["maildir-backup", "-u", "alice", &cp(&out.path().join("t1"))]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["within 1.0", "INBOX", "nothing was published"]);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    let r = run24(&d, &["maildir-backup", "-u", "alice", "-t", "2", &cp(&out.path().join("t2"))]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["within 2.0"]);
    assert!(r.elapsed >= Duration::from_secs(2) && r.elapsed < Duration::from_secs(20), "took {:?}", r.elapsed);
    assert!(!out.path().join("t1").exists() && !out.path().join("t2").exists());
    let left: Vec<String> = files_in(out.path()).into_iter().filter(|n| n.contains("staging")).collect();
    assert!(left.is_empty(), "staging left: {left:?}");
    holder.release();
    run24(&d, &["maildir-backup", "-u", "alice", "-t", "2", &cp(&out.path().join("t3"))]).expect_ok();

    // A bad value is a configuration error.
    run24(&d, &["-o", "maildir_backup_jobs=many", "maildir-backup", "-u", "alice", &cp(&out.path().join("j"))])
        .expect_code(EX_CONFIG)
        .expect_stderr(&["maildir_backup_jobs"]);
    eprintln!("d24_plugin_settings_overrides_and_lock_timeout: {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------------------
// 4. Restores

/// A snapshot from `backup --repo` restored with the CLI into a new 2.4 user's (missing) Maildir, then
/// chowned to vmail: 2.4 lists the same mailboxes with the same UIDs, GUIDs, flags and keywords, the same
/// UIDVALIDITY and UIDNEXT, and IMAP shows the same Message-ID under every UID.
#[test]
fn d24_full_restore_into_a_fresh_user() {
    let t0 = Instant::now();
    let d = Dovecot24::start(DovecotOptions::default());
    let folders = ["INBOX", "Sent", "Archive.2024"];
    d.populate("alice", &folders, 15);
    let mut imap = d.imap("alice");
    imap.select("INBOX").unwrap();
    imap.uid_store("2", "+FLAGS", "Project-X $Later").unwrap();
    imap.uid_store("3", "+FLAGS", "Project-X").unwrap();
    imap.uid_expunge("4,7").unwrap();
    imap.select("Sent").unwrap();
    imap.uid_store("1", "+FLAGS", "Urgent \\Draft").unwrap();
    imap.uid_expunge("2").unwrap();
    imap.logout();

    let repo = tempdir_in_root();
    let (snapshot, _) = take_snapshot(&d.maildir("alice").display().to_string(), &repo.path().join("repo"), "alice", &[]);
    d.add_user("fresh");
    let target = d.maildir("fresh");
    let mut cmd = mb();
    cmd.arg("restore").arg(&snapshot).arg(&target);
    let r = Run::of(cmd);
    assert_eq!(r.code(), Some(0), "{}", r.show());
    assert!(r.stdout.starts_with("full restore"), "{}", r.show());
    chown_vmail_recursive_root(&d.dir().join("mail/fresh"));

    let src = mailboxes24(&d, "alice", &[]);
    let dst = mailboxes24(&d, "fresh", &[]);
    assert_eq!(src.keys().collect::<Vec<_>>(), dst.keys().collect::<Vec<_>>());
    for name in src.keys() {
        let a = fetch24(&d, "alice", name, &[]);
        assert!(!a.is_empty(), "{name}");
        assert_eq!(a, fetch24(&d, "fresh", name, &[]), "{name}: alice (left) vs the restored user (right)");
        for field in ["uidvalidity", "uidnext", "messages"] {
            assert_eq!(mailbox_status24(&d, "alice", field, name), mailbox_status24(&d, "fresh", field, name), "{name}: {field}");
        }
    }
    let inbox = fetch24(&d, "fresh", "INBOX", &[]);
    assert!(inbox.iter().any(|m| m.uid == 2 && m.flags.contains("Project-X") && m.flags.contains("$Later")), "{inbox:?}");
    assert!(!inbox.iter().any(|m| m.uid == 4 || m.uid == 7), "expunged UIDs came back: {inbox:?}");
    let (mut ia, mut ib) = (d.imap("alice"), d.imap("fresh"));
    for name in folders {
        ia.select(name).unwrap();
        ib.select(name).unwrap();
        assert_eq!(mid_flags(&mut ia), mid_flags(&mut ib), "{name}: uid → (Message-ID, flags)");
    }
    ia.logout();
    ib.logout();
    assert_no_dovecot_errors(&d);
    eprintln!("d24_full_restore_into_a_fresh_user: {:.1?}", t0.elapsed());
}

/// alice (INBOX, Sent; 10 messages each) snapshotted by the plugin into `repo:`, then INBOX 1:3 and Sent 5
/// expunged. Returns the instance, its temp dir, the `repo:` argument and, per folder, the messages before
/// the expunge (uid → (Message-ID, flags)).
fn snapshot_then_expunge() -> (Dovecot24, tempfile::TempDir, String, BTreeMap<&'static str, BTreeMap<u32, (String, String)>>) {
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions::default());
    d.populate("alice", &["INBOX", "Sent"], 10);
    let out = tempdir_in_root();
    let repo = vmail_dir24(&out.path().join("repo"));
    let repo_arg = format!("repo:{}", cp(&repo));
    run24(&d, &["maildir-backup", "-u", "alice", &repo_arg]).expect_ok();
    assert!(repo.join("alice/latest").exists(), "{:?}", files_in(&repo.join("alice")));
    assert_verified(&repo.join("alice/latest"));
    let mut imap = d.imap("alice");
    let mut before = BTreeMap::new();
    for f in ["INBOX", "Sent"] {
        imap.select(f).unwrap();
        before.insert(f, mid_flags(&mut imap));
    }
    imap.select("INBOX").unwrap();
    imap.uid_expunge("1:3").unwrap();
    imap.select("Sent").unwrap();
    imap.uid_expunge("5").unwrap();
    imap.logout();
    (d, out, repo_arg, before)
}

fn restored_count(r: &Run) -> u64 {
    r.json_rows().iter().map(|row| row["restored"].parse::<u64>().unwrap()).sum()
}

/// The plugin's `doveadm maildir-backup-restore -u alice repo:REPO` merges the expunged messages back: the
/// same Message-IDs with the same flags, the restored ones under new UIDs, the others untouched.
#[test]
fn d24_plugin_restore_merges_expunged_messages() {
    let t0 = Instant::now();
    let (d, _out, repo_arg, before) = snapshot_then_expunge();
    let r = run24(&d, &["-f", "json", "maildir-backup-restore", "-u", "alice", &repo_arg]);
    r.expect_ok();
    assert_eq!(restored_count(&r), 4, "{}", r.show());
    assert!(r.json_rows().iter().all(|row| row["mode"] == "merge" && row["user"] == "alice"), "{}", r.show());
    let mut imap = d.imap("alice");
    for f in ["INBOX", "Sent"] {
        imap.select(f).unwrap();
        let after = mid_flags(&mut imap);
        let want: BTreeMap<String, String> = before[f].values().cloned().collect();
        let got: BTreeMap<String, String> = after.values().cloned().collect();
        assert_eq!(got, want, "{f}: Message-ID → flags after the merge");
        assert_eq!(after.len(), before[f].len(), "{f}: duplicates");
        let old: HashMap<&String, u32> = before[f].iter().map(|(u, (m, _))| (m, *u)).collect();
        for (uid, (mid, _)) in &after {
            let was = old[mid];
            let expunged = (f == "INBOX" && was <= 3) || (f == "Sent" && was == 5);
            if expunged {
                assert!(*uid > 10, "{f}: restored {mid} got uid {uid}, not a new one");
            } else {
                assert_eq!(*uid, was, "{f}: {mid} changed uid");
            }
        }
    }
    imap.logout();
    assert_no_dovecot_errors(&d);
    eprintln!("d24_plugin_restore_merges_expunged_messages: {:.1?} (restore {:.2?})", t0.elapsed(), r.elapsed);
}

/// Running the same merge restore twice must not restore anything the second time (no duplicates).
#[test]
fn d24_plugin_restore_twice_adds_nothing() {
    let t0 = Instant::now();
    let (d, _out, repo_arg, before) = snapshot_then_expunge();
    let r1 = run24(&d, &["-f", "json", "maildir-backup-restore", "-u", "alice", &repo_arg]);
    r1.expect_ok();
    assert_eq!(restored_count(&r1), 4, "{}", r1.show());
    let r2 = run24(&d, &["-f", "json", "maildir-backup-restore", "-u", "alice", &repo_arg]);
    r2.expect_ok();
    let mut imap = d.imap("alice");
    let mut counts = Vec::new();
    for f in ["INBOX", "Sent"] {
        imap.select(f).unwrap();
        counts.push((f, before[f].len(), mid_flags(&mut imap).len()));
    }
    imap.logout();
    eprintln!("restore 1: {:.2?}, restore 2: {:.2?}; (folder, before, after): {counts:?}", r1.elapsed, r2.elapsed);
    assert_eq!(restored_count(&r2), 0, "the second restore restored again; (folder, messages before, after): {counts:?}\n{}", r2.show());
    assert!(counts.iter().all(|(_, b, a)| b == a), "duplicates: {counts:?}");
    eprintln!("d24_plugin_restore_twice_adds_nothing: {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------------------
// 5. Cross-release

/// `DOVECOT_ABI_VERSION` from a config.h.
fn abi_of(config_h: &Path) -> String {
    let text = fs::read_to_string(config_h).unwrap_or_else(|e| panic!("{}: {e}", config_h.display()));
    text.lines()
        .find_map(|l| l.strip_prefix("#define DOVECOT_ABI_VERSION "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no DOVECOT_ABI_VERSION in {}", config_h.display()))
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Checks that doveadm (with `-D`) refused our module and said why, and that it did not crash.
fn assert_refused(r: &Run, what: &str) {
    assert!(!r.stderr.contains("Panic") && !r.stderr.contains("Fatal"), "{what}: doveadm crashed:\n{}", r.show());
    let line = r.stderr.lines().find(|l| l.contains("doveadm_maildir_backup_plugin") || l.contains(support::plugin::PLUGIN_FILE));
    let Some(line) = line else { panic!("{what}: doveadm -D does not mention our module:\n{}", r.show()) };
    assert!(
        line.contains("Module is for different ABI version") || (line.contains("dlopen() failed") && line.contains("undefined symbol")),
        "{what}: refused for another reason: {line}"
    );
    assert!(!r.stderr.contains("Module loaded:"), "{what}: a module was loaded:\n{}", r.show());
    eprintln!("{what}: {line}");
}

/// The plugin carries its Dovecot's ABI string; the 2.3 build in 2.4's doveadm and the 2.4 build in 2.3's
/// doveadm are refused (`doveadm -D` says why), `maildir-backup` is then an unknown command (usage, 64),
/// and a built-in command still works. Each build does load in its own release from the same kind of
/// private module dir (so the refusals are not an artefact of the bind mount).
#[test]
fn d24_cross_release_plugins_are_refused_cleanly() {
    let t0 = Instant::now();
    let so23 = support::plugin::plugin_so();
    let (so24, _) = plugin24_build();
    let (abi23, abi24) = (abi_of(Path::new("/usr/include/dovecot/config.h")), abi_of(&support::dovecot24::root().join("usr/include/dovecot/config.h")));
    assert_ne!(abi23, abi24);
    let (b23, b24) = (fs::read(&so23).unwrap(), fs::read(&so24).unwrap());
    assert!(contains(&b23, &abi23) && !contains(&b23, &abi24), "{} should carry {abi23}", so23.display());
    assert!(contains(&b24, &abi24) && !contains(&b24, &abi23), "{} should carry {abi24}", so24.display());
    let (m23_dir, m24_dir) = (module_dir_with(&so23), module_dir_with(&so24));
    let (m23, m24) = (m23_dir.path(), m24_dir.path());

    let d24 = Dovecot24::start(DovecotOptions::default());
    d24.populate("alice", &["INBOX", "Sent"], 2);
    let d23 = Dovecot::start(DovecotOptions::default());
    populate(&d23, "alice", &["INBOX", "Sent"], 2);

    // 2.3's plugin in 2.4's doveadm.
    let r = run24_with_module_dir(&d24, m23, &["-D", "mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(r.stdout.lines().any(|l| l == "Sent"), "{}", r.show());
    assert_refused(&r, "2.3 plugin in 2.4 doveadm");
    let r = run24_with_module_dir(&d24, m23, &["mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(!r.stderr.contains("Error") && !r.stderr.contains("Fatal"), "{}", r.show());
    let out24 = tempdir_in_root();
    vmail_dir24(out24.path());
    run24_with_module_dir(&d24, m23, &["maildir-backup", "-u", "alice", &cp(&out24.path().join("x"))]).expect_code(EX_USAGE).expect_stderr(&["usage"]);
    // The 2.4 build from the same kind of module dir loads and works.
    run24_with_module_dir(&d24, m24, &["maildir-backup", "-u", "alice", &cp(&out24.path().join("ok"))]).expect_ok();
    assert_verified(&out24.path().join("ok"));

    // 2.4's plugin in 2.3's doveadm.
    let r = run23_with_module_dir(&d23, m24, &["-D", "mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(r.stdout.lines().any(|l| l == "Sent"), "{}", r.show());
    assert_refused(&r, "2.4 plugin in 2.3 doveadm");
    let r = run23_with_module_dir(&d23, m24, &["mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(!r.stderr.contains("Error") && !r.stderr.contains("Fatal"), "{}", r.show());
    let out23 = vmail_tempdir();
    run23_with_module_dir(&d23, m24, &["maildir-backup", "-u", "alice", &out23.path().join("x").display().to_string()]).expect_code(EX_USAGE).expect_stderr(&["usage"]);
    run23_with_module_dir(&d23, m23, &["maildir-backup", "-u", "alice", &out23.path().join("ok").display().to_string()]).expect_ok();
    assert_verified(&out23.path().join("ok"));
    eprintln!("d24_cross_release_plugins_are_refused_cleanly: {:.1?}", t0.elapsed());
}
