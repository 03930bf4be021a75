//! The doveadm plugin in real doveadm of Dovecot 2.3 and 2.4 (backups, restores, settings, errors, metrics).
//!
//! The doveadm plugin end to end: real `doveadm` of both releases loading the real plugin (see
//! tests/support/plugin.rs: 2.3 through `unshare -m` + a bind mount over the module dir, 2.4 installed into
//! the Debian 13 root) against a private Dovecot on loopback. Backups are checked with
//! `maildir_backup::verify` and by reading them back through Dovecot (`-o mail_location=maildir:BACKUP:
//! INDEX=MEMORY`, on 2.4 the equivalent settings), against the source and against their own files.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::churn::{backups_under_churn, imap_churn, presence_problems, scan_message_ids, Churn, ChurnBackup, ChurnOptions, Tracker};
use support::plugin::*;
use support::procs::{files_in, LockHolder};
use support::readback::*;
use support::trixie::{in_root, tempdir_in_root};
use support::promtext;
use support::*;

const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive.2024", "Entwürfe"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A Dovecot with the given plain users, each populated with `FOLDERS` × `n` messages.
fn instance(users: &[&str], n: usize) -> Dovecot {
    let d = Dovecot::start(DovecotOptions { users: users.iter().map(|u| u.to_string()).collect(), ..Default::default() });
    for u in users {
        populate(&d, u, FOLDERS, n);
    }
    d
}

/// Nothing of a failed run is left at or beside `dest`.
fn assert_nothing_published(dest: &Path) {
    assert!(fs::symlink_metadata(dest).is_err(), "{} exists after a failed run", dest.display());
    let parent = dest.parent().unwrap();
    if let Ok(rd) = fs::read_dir(parent) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.contains("maildir-backup-staging"), "leftover {} in {}", n, parent.display());
        }
    }
}

/// Backed up, whole, and equal to the source as Dovecot reads both.
fn assert_good_backup(d: &Dovecot, user: &str, backup: &Path, layout_fs: bool) {
    assert_verified(backup);
    assert_no_problems(&format!("{user}: source vs backup"), &compare_source_and_backup(d, user, user, backup, layout_fs));
    assert_no_problems(&format!("{user}: Dovecot reading the backup"), &check_dovecot_reads_backup(d, user, backup, layout_fs));
}

// ---------------------------------------------------------------------------------------------------------
// 1. Under live IMAP churn

/// `-u alice` five times while IMAP sessions change flags (STORE + NOOP), move (UID MOVE), append and
/// expunge, and dovecot-lda delivers: nothing that existed before a backup started and was not expunged
/// during it is lost or duplicated (by Message-ID), every backup verifies, and Dovecot reading each
/// backup shows exactly the UIDs of its dovecot-uidlist and the flags of its file names.
#[test]
fn backups_under_imap_churn_lose_nothing() {
    let d = Dovecot::start(DovecotOptions::default());
    let folders = ["INBOX", "Sent", "Archive", "Archive.2024"];
    populate(&d, "alice", &folders, 120);
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&d.maildir("alice")), 480);
    let out = vmail_tempdir();

    let churn = Churn::start(
        ChurnOptions {
            port: d.port(),
            conf: d.conf().to_path_buf(),
            user: "alice".into(),
            folders: folders.iter().map(|f| f.to_string()).collect(),
            imap_workers: 3,
            lda: true,
            pace: Duration::ZERO,
            lda_pace: Duration::from_millis(40),
            folder_worker: false,
        },
        tracker.clone(),
    );
    churn.wait_ops(40, Duration::from_secs(30));
    let (runs, _) = backups_under_churn(churn, &tracker, out.path(), "alice-", 5, (25, Duration::from_secs(30)), |dest| {
        run_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", "-j", "2", s(dest)])
    });

    for ChurnBackup { dest, start, end, run: r } in &runs {
        assert_verified(dest);
        assert_no_problems(&format!("{}: presence", dest.display()), &presence_problems(&tracker, dest, *start, *end));
        assert_no_problems("Dovecot reading the backup", &check_dovecot_reads_backup(&d, "alice", dest, false));

        // The rows printed are the backup's folders.
        let manifest = read_manifest(dest);
        let rows = r.json_rows();
        let printed: BTreeMap<String, u64> = rows.iter().map(|r| (r["mailbox"].clone(), r["messages"].parse().unwrap())).collect();
        let recorded: BTreeMap<String, u64> = manifest.folders.iter().map(|f| (f.name.clone(), f.messages)).collect();
        assert_eq!(printed, recorded, "{}", r.show());
    }
}

/// Starts `doveadm maildir-backup -u alice DEST` while `Sent`'s uidlist lock is held by someone else, so
/// the backup lists the mailboxes and copies them but cannot reconcile; runs `meanwhile` in that window
/// (IMAP work that needs other folders' locks only), then releases the lock and waits for the backup.
fn backup_with_a_window(d: &Dovecot, dest: &Path, meanwhile: impl FnOnce()) -> Run {
    let holder = LockHolder::start(&d.mailbox_path("alice", "Sent", "control"), 60);
    let args: Vec<String> = ["maildir-backup", "-u", "alice", "-t", "60", s(dest)].iter().map(|a| a.to_string()).collect();
    std::thread::scope(|sc| {
        let h = sc.spawn(|| run_plugin(d, &args.iter().map(String::as_str).collect::<Vec<_>>()));
        std::thread::sleep(Duration::from_millis(800));
        assert!(!h.is_finished(), "the backup did not wait for the held lock");
        meanwhile();
        assert!(!h.is_finished(), "the backup did not wait for the held lock");
        holder.release();
        h.join().unwrap()
    })
}

/// A folder created, and messages moved into it from INBOX, while a backup runs: the reconcile must
/// find them in the new folder (INBOX no longer has them), else they are silently missing.
#[test]
fn messages_moved_into_a_new_folder_during_a_backup_are_kept() {
    let d = instance(&["alice"], 30);
    let out = vmail_tempdir();
    let dest = out.path().join("alice");
    let before = scan_message_ids(&d.maildir("alice"));
    let r = backup_with_a_window(&d, &dest, || {
        let mut imap = d.imap("alice");
        imap.create("Projects").unwrap();
        imap.select("INBOX").unwrap();
        imap.uid_move("1:20", "Projects").unwrap();
        imap.logout();
    });
    r.expect_ok();
    assert_verified(&dest);
    let after = scan_message_ids(&dest);
    let missing: Vec<&String> = before.keys().filter(|m| !after.contains_key(*m)).collect();
    assert!(missing.is_empty(), "{} of {} messages missing from the backup (moved into the new folder Projects during the backup); backup folders: {:?}", missing.len(), before.len(), read_manifest(&dest).folders.iter().map(|f| &f.name).collect::<Vec<_>>());
}

/// A folder renamed while a backup runs: the backup still succeeds and has its messages.
#[test]
fn folder_renamed_during_a_backup_is_backed_up() {
    let d = instance(&["alice"], 10);
    let out = vmail_tempdir();
    let dest = out.path().join("alice");
    let before = scan_message_ids(&d.maildir("alice"));
    let r = backup_with_a_window(&d, &dest, || {
        let mut imap = d.imap("alice");
        imap.command(&format!("RENAME {} {}", imap_quote("Archive.2024"), imap_quote("Archive.2025"))).unwrap();
        imap.logout();
    });
    r.expect_ok();
    assert_verified(&dest);
    let after = scan_message_ids(&dest);
    let missing: Vec<&String> = before.keys().filter(|m| !after.contains_key(*m)).collect();
    assert!(missing.is_empty(), "{} messages missing", missing.len());
    assert!(dest.join(".Archive.2025/cur").is_dir() && !dest.join(".Archive.2024").exists());
}

// ---------------------------------------------------------------------------------------------------------
// 2. -A over users configured only through dovecot.conf and the userdb

/// alice, bob and carol each get `FOLDERS` × 12, 13, 14 messages, with gaps in Sent (3, 5 and 6 expunged).
fn populate_three_users<R: Release>(d: &Instance<R>) {
    for (i, u) in ["alice", "bob", "carol"].iter().enumerate() {
        populate(d, u, FOLDERS, 12 + i);
        expunge(d, u, "Sent", "3,5:6");
    }
}

/// The `-A` backups in `out` of the all-users tests: bob's control files were brought into the backup's
/// own folders (a self-contained Maildir), carol's is in fs layout, dave's is empty.
fn assert_all_users_backups_shaped(out: &Path) {
    let b = out.join("bob");
    for f in ["dovecot-uidlist", "dovecot-keywords", ".Sent/dovecot-uidlist", ".Archive.2024/dovecot-uidlist", "dovecot-uidvalidity"] {
        assert!(b.join(f).is_file(), "bob's backup lacks {f}");
    }
    assert!(!b.join(".INBOX").exists(), "bob's backup has a .INBOX control dir");
    assert!(out.join("carol/Archive/2024/cur").is_dir());
    assert_eq!(read_manifest(&out.join("dave")).header.messages, 0);
}

/// `-A DEST/%u` over four users: alice (the global Maildir++ location), bob (`userdb_mail` with
/// CONTROL= and INDEX= split dirs), carol (`userdb_mail` with LAYOUT=fs) and dave (never logged in).
/// Every backup verifies, is a self-contained Maildir, and Dovecot reads the same mailboxes with the same
/// (uid, guid, flags) from it as from the source.
#[test]
fn all_users_with_split_dirs_and_fs_layout() {
    let d = Dovecot::start(DovecotOptions::default());
    let dir = d.dir().to_path_buf();
    vmail_dir(&dir.join("ctl"));
    vmail_dir(&dir.join("idx"));
    let bob_loc = format!("maildir:{0}/mail/%u/Maildir:CONTROL={0}/ctl/%u:INDEX={0}/idx/%u", dir.display());
    let carol_loc = format!("maildir:{0}/mail/%u/Maildir:LAYOUT=fs", dir.display());
    d.add_userdb_user("bob", &format!("userdb_mail={bob_loc}"));
    d.add_userdb_user("carol", &format!("userdb_mail={carol_loc}"));
    d.add_userdb_user("dave", "");
    populate_three_users(&d);
    // The configuration really is what it claims.
    assert!(dir.join("ctl/bob/.INBOX/dovecot-uidlist").is_file());
    assert!(dir.join("ctl/bob/.Sent/dovecot-uidlist").is_file());
    assert!(!dir.join("mail/bob/Maildir/dovecot-uidlist").exists());
    assert!(dir.join("idx/bob/.INBOX").is_dir() || dir.join("idx/bob/dovecot.list.index.log").exists());
    assert!(dir.join("mail/carol/Maildir/Archive/2024/cur").is_dir());
    assert!(dir.join("mail/carol/Maildir/Sent/cur").is_dir());

    let out = vmail_tempdir();
    let r = run_plugin(&d, &["-f", "json", "maildir-backup", "-A", &format!("{}/%u", out.path().display())]);
    r.expect_ok();
    let users: BTreeSet<String> = r.json_rows().iter().map(|row| row["user"].clone()).collect();
    assert_eq!(users, ["alice", "bob", "carol", "dave"].iter().map(|u| u.to_string()).collect(), "{}", r.show());

    for (user, fs_layout, loc) in [
        ("alice", false, d.mail_location("alice")),
        ("bob", false, bob_loc.replace("%u", "bob")),
        ("carol", true, carol_loc.replace("%u", "carol")),
        ("dave", false, d.mail_location("dave")),
    ] {
        let b = out.path().join(user);
        assert_good_backup(&d, user, &b, fs_layout);
        assert_eq!(read_manifest(&b).header.source, loc, "{user}: manifest source");
    }
    assert_all_users_backups_shaped(out.path());
}

// ---------------------------------------------------------------------------------------------------------
// 3. -f json

/// `-f json` parses, has one row per backed-up mailbox, and each row's messages and bytes equal the
/// manifest's folder record, the message files on disk, and what Dovecot lists in the source.
#[test]
fn json_rows_match_the_backup() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent"], 25);
    populate(&d, "alice", &["Archive.2024"], 7);
    d.create_mailbox("alice", "Empty");
    expunge(&d, "alice", "INBOX", "2:4");
    let out = vmail_tempdir();
    let dest = out.path().join("alice");
    let r = run_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", s(&dest)]);
    r.expect_ok();
    let rows = r.json_rows();
    let manifest = read_manifest(&dest);
    assert_eq!(rows.len(), 4, "{}", r.show());
    assert_eq!(rows.len(), manifest.folders.len());
    let mut total = 0;
    for row in &rows {
        let keys: BTreeSet<&str> = row.keys().map(String::as_str).collect();
        for k in ["user", "mailbox", "messages", "bytes", "lock_ms", "status"] {
            assert!(keys.contains(k), "row {row:?} lacks {k}");
        }
        assert_eq!(row["user"], "alice");
        assert_eq!(row["status"], "ok");
        let lock_ms: f64 = row["lock_ms"].parse().unwrap_or_else(|_| panic!("lock_ms {:?}", row["lock_ms"]));
        assert!(lock_ms >= 0.0 && (lock_ms - manifest.header.lock_hold_ms as f64).abs() <= 1.1, "lock_ms {lock_ms} vs manifest {}", manifest.header.lock_hold_ms);
        let mailbox = &row["mailbox"];
        let rec = manifest.folders.iter().find(|f| &f.name == mailbox).unwrap_or_else(|| panic!("row for {mailbox}: no folder record {:?}", manifest.folders));
        let messages: u64 = row["messages"].parse().unwrap();
        let bytes: u64 = row["bytes"].parse().unwrap();
        let on_disk = message_files(&dest.join(&rec.path));
        let on_disk: Vec<u64> = if rec.path.is_empty() {
            // INBOX: only the root's own cur/ and new/.
            on_disk.values().filter(|(p, _)| p.starts_with("cur/") || p.starts_with("new/")).map(|(_, s)| *s).collect()
        } else {
            on_disk.values().map(|(_, s)| *s).collect()
        };
        assert_eq!(messages, rec.messages, "{mailbox}: row vs manifest folder record");
        assert_eq!(messages, on_disk.len() as u64, "{mailbox}: row vs files");
        assert_eq!(bytes, manifest.messages.iter().filter(|m| m.folder == rec.path).map(|m| m.size).sum::<u64>(), "{mailbox}: bytes vs manifest");
        assert_eq!(bytes, on_disk.iter().sum::<u64>(), "{mailbox}: bytes vs files");
        assert_eq!(messages, fetch(&d, "alice", mailbox, None).len() as u64, "{mailbox}: row vs Dovecot's source");
        total += messages;
    }
    assert_eq!(total, 25 - 3 + 25 + 7);
    assert_eq!(total, manifest.header.messages);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Errors: a clear message, the right sysexits code, and the other users still backed up

#[test]
fn unknown_user_is_exit_67_and_skipped_in_a_users_file() {
    let d = instance(&["alice", "bob"], 6);
    let out = vmail_tempdir();
    let tpl = format!("{}/%u", out.path().display());
    run_plugin(&d, &["maildir-backup", "-u", "nosuchuser", &tpl]).expect_code(EX_NOUSER).expect_stderr(&["nosuchuser", "doesn't exist"]);
    assert_nothing_published(&out.path().join("nosuchuser"));

    let users = users_file(out.path(), &["alice", "nosuchuser", "bob"]);
    // doveadm's own rule for -F: a user that does not exist is skipped (logged), not an error.
    run_plugin(&d, &["maildir-backup", "-F", s(&users), &tpl]).expect_ok().expect_stderr(&["nosuchuser"]);
    assert_nothing_published(&out.path().join("nosuchuser"));
    assert_good_backup(&d, "alice", &out.path().join("alice"), false);
    assert_good_backup(&d, "bob", &out.path().join("bob"), false);
}

#[test]
fn unwritable_destination_is_exit_77_and_others_continue() {
    let d = instance(&["alice", "bob"], 6);
    let out = vmail_tempdir();
    // alice's parent belongs to root (0755): vmail, whose privileges doveadm uses, cannot write there.
    let locked = out.path().join("alice");
    fs::create_dir(&locked).unwrap();
    vmail_dir(&out.path().join("bob"));
    let tpl = format!("{}/%u/backup", out.path().display());

    run_plugin(&d, &["maildir-backup", "-u", "alice", &tpl]).expect_code(EX_NOPERM).expect_stderr(&["alice", "Permission denied", "nothing was published"]);
    let users = users_file(out.path(), &["alice", "bob"]);
    let r = run_plugin(&d, &["maildir-backup", "-F", s(&users), &tpl]);
    r.expect_code(EX_NOPERM).expect_stderr(&["user alice", "Permission denied"]);
    assert!(!r.stderr.contains("user bob"), "{}", r.show());
    assert_eq!(fs::read_dir(&locked).unwrap().count(), 0, "something was written under {}", locked.display());
    assert_good_backup(&d, "bob", &out.path().join("bob/backup"), false);
}

#[test]
fn lock_timeout_is_exit_75_and_others_continue() {
    let d = instance(&["alice", "bob"], 6);
    let out = vmail_tempdir();
    let tpl = format!("{}/%u", out.path().display());
    let sent_control = d.mailbox_path("alice", "Sent", "control");
    let holder = LockHolder::start(&sent_control, 30);
    let held = fs::read(&holder.lock_path).unwrap();

    let users = users_file(out.path(), &["alice", "bob"]);
    let r = run_plugin(&d, &["maildir-backup", "-F", s(&users), "-t", "2", &tpl]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["user alice", "lock", "Sent", "nothing was published"]);
    assert!(r.elapsed >= Duration::from_secs(2) && r.elapsed < Duration::from_secs(20), "took {:?}", r.elapsed);
    assert_nothing_published(&out.path().join("alice"));
    // The foreign lock is untouched, and the plugin left none of its own behind.
    assert_eq!(fs::read(&holder.lock_path).unwrap(), held);
    for f in support::churn::all_files(&d.maildir("alice")) {
        if f.file_name().unwrap() == "dovecot-uidlist.lock" {
            assert_eq!(f, holder.lock_path, "a lock left behind");
        }
    }
    assert_good_backup(&d, "bob", &out.path().join("bob"), false);

    // Released: the same command now succeeds for alice.
    holder.release();
    run_plugin(&d, &["maildir-backup", "-u", "alice", "-t", "10", &tpl]).expect_ok();
    assert_good_backup(&d, "alice", &out.path().join("alice"), false);
}

#[test]
fn mdbox_user_is_exit_65_and_others_continue() {
    let d = instance(&["alice"], 6);
    let mdbox = vmail_dir(&d.dir().join("mdbox"));
    d.add_userdb_user("mdb", &format!("userdb_mail=mdbox:{}/%u", mdbox.display()));
    d.add_userdb_user("bob", "");
    populate(&d, "mdb", &["INBOX", "Sent"], 4);
    populate(&d, "bob", FOLDERS, 5);
    let out = vmail_tempdir();
    let tpl = format!("{}/%u", out.path().display());

    // -A goes through the passwd file in order: alice, mdb, bob.
    let r = run_plugin(&d, &["-f", "json", "maildir-backup", "-A", &tpl]);
    r.expect_code(EX_DATAERR).expect_stderr(&["user mdb", "not a Maildir", "mdbox"]);
    assert!(!r.stderr.contains("Panic"), "{}", r.show());
    let rows = r.json_rows();
    let mdb_rows: Vec<_> = rows.iter().filter(|row| row["user"] == "mdb").collect();
    assert_eq!(mdb_rows.len(), 2, "{}", r.show());
    for row in &mdb_rows {
        assert!(row["status"].contains("not a Maildir"), "{row:?}");
    }
    assert!(rows.iter().filter(|row| row["user"] != "mdb").all(|row| row["status"] == "ok"), "{}", r.show());
    assert_nothing_published(&out.path().join("mdb"));
    assert_good_backup(&d, "alice", &out.path().join("alice"), false);
    assert_good_backup(&d, "bob", &out.path().join("bob"), false);

    let r = run_plugin(&d, &["maildir-backup", "-u", "mdb", &format!("{}/single", out.path().display())]);
    r.expect_code(EX_DATAERR).expect_stderr(&["not a Maildir"]);
    assert_nothing_published(&out.path().join("single"));
}

#[test]
fn existing_destination_is_exit_73_and_others_continue() {
    let d = instance(&["alice", "bob"], 6);
    let out = vmail_tempdir();
    let tpl = format!("{}/%u", out.path().display());
    let existing = vmail_dir(&out.path().join("alice"));
    fs::write(existing.join("precious"), "keep me").unwrap();

    run_plugin(&d, &["maildir-backup", "-u", "alice", &tpl]).expect_code(EX_CANTCREAT).expect_stderr(&["already exists"]);
    let users = users_file(out.path(), &["alice", "bob"]);
    run_plugin(&d, &["maildir-backup", "-F", s(&users), &tpl]).expect_code(EX_CANTCREAT).expect_stderr(&["user alice", "already exists"]);
    let left: Vec<String> = fs::read_dir(&existing).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["precious"]);
    assert_eq!(fs::read_to_string(existing.join("precious")).unwrap(), "keep me");
    assert_good_backup(&d, "bob", &out.path().join("bob"), false);
}

#[test]
fn no_or_bad_destination_is_exit_64() {
    let d = instance(&["alice", "bob"], 3);
    let out = vmail_tempdir();
    let users = users_file(out.path(), &["alice", "bob"]);
    run_plugin(&d, &["maildir-backup", "-u", "alice"]).expect_code(EX_USAGE).expect_stderr(&["no destination"]);
    run_plugin(&d, &["maildir-backup", "-F", s(&users)]).expect_code(EX_USAGE).expect_stderr(&["user alice: no destination", "user bob: no destination"]);
    run_plugin(&d, &["maildir-backup", "-u", "alice", &format!("{}/%x", out.path().display())]).expect_code(EX_USAGE).expect_stderr(&["%x"]);
    run_plugin(&d, &["maildir-backup", "-u", "alice", "-t", "soon", &format!("{}/t", out.path().display())]).expect_code(EX_USAGE).expect_stderr(&["lock timeout"]);
    let left: Vec<_> = fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "only the users file should be there: {left:?}");
}

// ---------------------------------------------------------------------------------------------------------
// 5. Settings from dovecot.conf

/// `plugin { maildir_backup_dest, maildir_backup_lock_timeout, maildir_backup_with_indexes }` are
/// honoured, and the command line wins over them.
#[test]
fn settings_from_dovecot_conf_and_command_line_wins() {
    let out = vmail_tempdir();
    let conf_dest = vmail_dir(&out.path().join("conf"));
    let d = Dovecot::start(DovecotOptions {
        extra_conf: format!(
            "plugin {{\n  maildir_backup_dest = {}/%u\n  maildir_backup_lock_timeout = 1\n  maildir_backup_with_indexes = yes\n  maildir_backup_jobs = 2\n}}\n",
            conf_dest.display()
        ),
        ..Default::default()
    });
    populate(&d, "alice", FOLDERS, 8);

    // The command line's destination wins...
    let cli_dest = out.path().join("cli-alice");
    run_plugin(&d, &["maildir-backup", "-u", "alice", s(&cli_dest)]).expect_ok();
    assert!(!conf_dest.join("alice").exists(), "the configured destination was used although one was given");
    assert_good_backup(&d, "alice", &cli_dest, false);
    // ...and without one, the configured one is used (with %u expanded).
    run_plugin(&d, &["maildir-backup", "-u", "alice"]).expect_ok();
    let b = conf_dest.join("alice");
    assert_good_backup(&d, "alice", &b, false);
    // maildir_backup_with_indexes = yes: Dovecot's index files came along.
    for bk in [&b, &cli_dest] {
        assert!(bk.join("dovecot.index.log").is_file(), "{}: no index files", bk.display());
        assert!(bk.join(".Sent/dovecot.index.log").is_file(), "{}: no .Sent index files", bk.display());
    }

    // maildir_backup_lock_timeout = 1 (the default would wait 122 s), and -t wins over it.
    let holder = LockHolder::start(&d.mailbox_path("alice", "INBOX", "control"), 30);
    let r = run_plugin(&d, &["maildir-backup", "-u", "alice", s(&out.path().join("t1"))]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["user alice", "lock"]);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    let r = run_plugin(&d, &["maildir-backup", "-u", "alice", "-t", "3", s(&out.path().join("t3"))]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["user alice", "lock"]);
    assert!(r.elapsed >= Duration::from_secs(3), "took {:?}", r.elapsed);
    drop(holder);

    // A bad setting is a configuration error.
    run_plugin(&d, &["-o", "plugin/maildir_backup_jobs=many", "maildir-backup", "-u", "alice", s(&out.path().join("j"))])
        .expect_code(EX_CONFIG)
        .expect_stderr(&["maildir_backup_jobs"]);
}

// ---------------------------------------------------------------------------------------------------------
// 6. Plugin and CLI agree

/// The plugin (`-u USER`) and the CLI (`maildir-backup backup MAIL_LOCATION DEST`) make the same backup of
/// the same quiescent Maildir: the same files and directories (names and modes) and the same manifest
/// (folder and message records; header apart from its timing fields). Checked for Maildir++ and LAYOUT=fs,
/// with a nested, a non-ASCII and an empty folder.
#[test]
fn plugin_and_cli_make_identical_backups() {
    let d = Dovecot::start(DovecotOptions::default());
    let fs_loc = format!("maildir:{}/mail/%u/Maildir:LAYOUT=fs", d.dir().display());
    d.add_userdb_user("fsuser", &format!("userdb_mail={fs_loc}"));
    let out = vmail_tempdir();
    for (user, loc) in [("alice", d.mail_location("alice")), ("fsuser", fs_loc.replace("%u", "fsuser"))] {
        populate(&d, user, FOLDERS, 9);
        d.create_mailbox(user, "Empty");
        expunge(&d, user, "INBOX", "4");
        // Select everything once so Dovecot has written what it writes on first access.
        for m in mailboxes(&d, user, None).keys() {
            fetch(&d, user, m, None);
        }

        let p = out.path().join(format!("{user}-plugin"));
        let c = out.path().join(format!("{user}-cli"));
        run_plugin(&d, &["maildir-backup", "-u", user, s(&p)]).expect_ok();
        let cli = Command::new(cli_bin()).args(["backup", "-q", &loc, s(&c)]).output().unwrap();
        assert!(cli.status.success(), "CLI backup failed: {}", String::from_utf8_lossy(&cli.stderr));

        let (tp, tc) = (tree_modes(&p), tree_modes(&c));
        let (np, nc): (Vec<&String>, Vec<&String>) = (tp.keys().collect(), tc.keys().collect());
        assert_eq!(np, nc, "{user}: files/dirs differ between the plugin's (left) and the CLI's (right) backup");
        let (mp, mc) = (read_manifest(&p), read_manifest(&c));
        let strip = |mut h: maildir_backup::manifest::Header| {
            h.taken_at = 0;
            h.lock_hold_ms = 0;
            // Only a backup made by root records whose mail it is (the plugin runs as the user).
            h.owner = None;
            h
        };
        if mc.header.lock_hold_ms > 5000 {
            eprintln!("note: the CLI held the uidlist locks for {} ms on a tiny quiescent Maildir", mc.header.lock_hold_ms);
        }
        assert_eq!(strip(mp.header.clone()), strip(mc.header.clone()), "{user}: manifest headers");
        assert_eq!(mp.folders, mc.folders, "{user}: manifest folder records (plugin left, CLI right)");
        assert_eq!(mp.messages, mc.messages, "{user}: manifest message records");
        for f in ["dovecot-uidlist", "dovecot-keywords", ".Sent/dovecot-uidlist", "Sent/dovecot-uidlist", "subscriptions"] {
            if p.join(f).exists() || c.join(f).exists() {
                assert_eq!(fs::read(p.join(f)).ok(), fs::read(c.join(f)).ok(), "{user}: {f} differs");
            }
        }
        let modes: Vec<String> = tp.iter().filter(|(k, m)| tc[*k] != **m).map(|(k, m)| format!("{k}: plugin {m:o}, CLI {:o}", tc[k])).collect();
        assert!(modes.is_empty(), "{user}: modes differ: {modes:?}");
        assert_good_backup(&d, user, &p, user == "fsuser");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 7. -m

/// `-m INBOX -m Sent` backs up exactly those two mailboxes (and a wildcard works too).
#[test]
fn mailbox_options_select_mailboxes() {
    let d = instance(&["alice"], 5);
    populate(&d, "alice", &["Trash"], 3);
    let out = vmail_tempdir();
    let dest = out.path().join("two");
    let r = run_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", "-m", "INBOX", "-m", "Sent", s(&dest)]);
    r.expect_ok();
    let printed: BTreeSet<String> = r.json_rows().iter().map(|row| row["mailbox"].clone()).collect();
    assert_eq!(printed, ["INBOX", "Sent"].iter().map(|m| m.to_string()).collect());
    assert_verified(&dest);
    let m = read_manifest(&dest);
    let names: BTreeSet<&str> = m.folders.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["INBOX", "Sent"].into_iter().collect());
    assert_eq!(m.header.messages, 10);
    let dirs: BTreeSet<String> = fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert_eq!(dirs, [".Sent".to_string()].into_iter().collect());
    for name in ["INBOX", "Sent"] {
        let src = fetch(&d, "alice", name, None);
        let bak = fetch(&d, "alice", name, Some(&backup_location(&dest, false)));
        assert_eq!(src, bak, "{name}");
    }

    let dest = out.path().join("wild");
    run_plugin(&d, &["maildir-backup", "-u", "alice", "-m", "Arch*", "-m", "Trash", s(&dest)]).expect_ok();
    let names: BTreeSet<String> = read_manifest(&dest).folders.iter().map(|f| f.name.clone()).collect();
    assert_eq!(names, ["Archive.2024", "Trash"].iter().map(|m| m.to_string()).collect());
}

/// A pattern that matches no mailbox must not crash doveadm (whatever it then reports).
#[test]
fn mailbox_option_matching_nothing_does_not_crash() {
    let d = instance(&["alice"], 2);
    let out = vmail_tempdir();
    let r = run_plugin(&d, &["maildir-backup", "-u", "alice", "-m", "NoSuchMailbox", s(&out.path().join("none"))]);
    assert!(matches!(r.code(), Some(c) if c < 128) && !r.stderr.contains("Panic"), "doveadm crashed:\n{}", r.show());
}

/// A relative destination means relative to where doveadm was started, with `-u` as with `-A`/`-F`
/// (doveadm itself changes directory before it runs a command for a single user).
#[test]
fn relative_destination_is_relative_to_the_callers_directory() {
    let d = instance(&["alice", "bob"], 3);
    let out = vmail_tempdir();
    let users = users_file(out.path(), &["bob"]);
    run_plugin_in(&d, Some(out.path()), &["maildir-backup", "-F", s(&users), "rel-f/%u"]).expect_ok();
    assert_verified(&out.path().join("rel-f/bob"));
    let r = run_plugin_in(&d, Some(out.path()), &["maildir-backup", "-u", "alice", "rel-u/%u"]);
    r.expect_ok();
    assert_verified(&out.path().join("rel-u/alice"));
}

// ---------------------------------------------------------------------------------------------------------
// 8. Smoke: one user, and a repository snapshot restored

#[test]
fn plugin_backs_up_a_user() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent", "Archive"], 30);
    let out = tempdir();
    chown_vmail_recursive(out.path());
    let dest = out.path().join("alice-backup");
    let o = run_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", dest.to_str().unwrap()]);
    eprintln!("stdout: {}\nstderr: {}", o.stdout, o.stderr);
    assert!(o.status.success());
    let v = maildir_backup::verify::verify(&dest, 2).unwrap();
    assert!(v.is_whole(), "{:?}", v.problems);
    assert_eq!(v.messages, 90);
}

#[test]
fn plugin_snapshots_into_a_repo_and_restores_from_it() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent"], 10);
    let out = tempdir();
    chown_vmail_recursive(out.path());
    let repo = out.path().join("repo");
    let o = run_plugin(&d, &["maildir-backup", "-u", "alice", &format!("repo:{}", repo.display())]);
    eprintln!("{}{}", o.stdout, o.stderr);
    assert!(o.status.success());
    assert!(repo.join("alice/latest").exists());
    let mut imap = d.imap("alice"); imap.select("INBOX").unwrap(); imap.uid_expunge("1:3").unwrap(); imap.logout();
    let o = run_plugin(&d, &["maildir-backup-restore", "-u", "alice", "-m", "INBOX", &format!("repo:{}", repo.display())]);
    eprintln!("{}{}", o.stdout, o.stderr);
    assert!(o.status.success());
    assert_eq!(d.fetch_uid_flags("alice", "INBOX", None).len(), 10);
}

// ---------------------------------------------------------------------------------------------------------
// 9. The plugin in Dovecot 2.4's doveadm

/// `doveadm -f json maildir-backup -u alice -j 2 DEST` five times under IMAP churn: nothing lost or
/// duplicated, every backup verifies, 2.4 reads each with its own uidlist's UIDs/GUIDs and its names' flags,
/// and the JSON rows are the manifest's folders.
#[test]
fn d24_plugin_user_backups_under_churn() {
    let t0 = Instant::now();
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions { extra_conf: "mail_max_userip_connections = 50\n".into(), ..Default::default() });
    let folders = ["INBOX", "Sent", "Archive", "Archive.2024"];
    populate(&d, "alice", &folders, 100);
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&d.maildir("alice")), 400);
    let out = tempdir_in_root();
    vmail_dir24(out.path());

    let churn = Churn::start(imap_churn(&d, &folders, 3), tracker.clone());
    churn.wait_ops(30, Duration::from_secs(20));
    let (runs, _) = backups_under_churn(churn, &tracker, out.path(), "alice-", 5, (20, Duration::from_secs(20)), |dest| {
        run_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", "-j", "2", &in_root(dest)])
    });
    for ChurnBackup { dest, start, end, run: r } in &runs {
        assert_verified(dest);
        assert_no_problems(&format!("{}: presence", dest.display()), &presence_problems(&tracker, dest, *start, *end));
        assert_no_problems("Dovecot 2.4 reading the backup", &check_dovecot_reads_backup(&d, "alice", dest, false));
        let manifest = read_manifest(dest);
        let printed = rows_by_user(&r.json_rows()).remove("alice").unwrap_or_default();
        let recorded: BTreeMap<String, u64> = manifest.folders.iter().map(|f| (f.name.clone(), f.messages)).collect();
        assert_eq!(printed, recorded, "{}", r.show());
    }
    eprintln!("d24_plugin_user_backups_under_churn: {:.1?}", t0.elapsed());
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
    d.add_userdb_user("bob", &format!("userdb_mail_control_path={c}/ctl/%{{user}} userdb_mail_index_path={c}/idx/%{{user}}"));
    d.add_userdb_user("carol", &format!("userdb_mail_path={c}/fsmail/%{{user}} userdb_mailbox_list_layout=fs"));
    d.add_userdb_user("dave", "");
    populate_three_users(&d);
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
    let r = run_plugin(&d, &["-f", "json", "maildir-backup", "-A", &format!("{}/%{{user}}", in_root(out.path()))]);
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
        assert!(m.header.source.contains(&in_root(&mail_root)), "{user}: manifest source {:?}", m.header.source);
        if user == "bob" {
            assert!(m.header.source.contains(&format!("{c}/ctl/bob")), "bob: manifest source {:?}", m.header.source);
        }
        // Read as alice: she has no userdb fields, so only the overrides name the backup's layout.
        assert_no_problems(&format!("{user}: source vs backup"), &compare_source_and_backup(&d, user, "alice", &b, fs_layout));
        assert_no_problems(&format!("{user}: Dovecot 2.4 reading the backup"), &check_dovecot_reads_backup(&d, "alice", &b, fs_layout));
    }
    assert_all_users_backups_shaped(out.path());
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
            in_root(&conf_dest)
        ),
        ..Default::default()
    });
    populate(&d, "alice", FOLDERS, 8);

    // The command line's destination wins...
    let cli_dest = out.path().join("cli-alice");
    run_plugin(&d, &["maildir-backup", "-u", "alice", &in_root(&cli_dest)]).expect_ok();
    assert!(!conf_dest.join("alice").exists(), "the configured destination was used although one was given");
    assert_verified(&cli_dest);
    // ...without one, the configured one is used (%{user} expanded)...
    run_plugin(&d, &["maildir-backup", "-u", "alice"]).expect_ok();
    let b = conf_dest.join("alice");
    assert_verified(&b);
    assert_no_problems("conf dest: source vs backup", &compare_source_and_backup(&d, "alice", "alice", &b, false));
    // ...and `-o maildir_backup_dest=` overrides the configured one.
    let o_dest = vmail_dir24(&out.path().join("o"));
    run_plugin(&d, &["-o", &format!("maildir_backup_dest={}/%{{user}}", in_root(&o_dest)), "maildir-backup", "-u", "alice"]).expect_ok();
    assert_verified(&o_dest.join("alice"));
    assert_eq!(files_in(&conf_dest), ["alice"], "the -o override was not used");
    // maildir_backup_with_indexes = yes: Dovecot's index files came along.
    for bk in [&b, &cli_dest, &o_dest.join("alice")] {
        assert!(bk.join("dovecot.index.log").is_file(), "{}: no index files", bk.display());
        assert!(bk.join(".Sent/dovecot.index.log").is_file(), "{}: no .Sent index files", bk.display());
    }

    // maildir_backup_lock_timeout = 1s (the default would wait 122 s), and -t wins over it.
    let holder = LockHolder::start(&d.mailbox_path("alice", "INBOX", "control"), 30);
    let r = run_plugin(&d, &["maildir-backup", "-u", "alice", &in_root(&out.path().join("t1"))]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["lock timeout of 1.0s", "INBOX", "nothing was published"]);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    let r = run_plugin(&d, &["maildir-backup", "-u", "alice", "-t", "2", &in_root(&out.path().join("t2"))]);
    r.expect_code(EX_TEMPFAIL).expect_stderr(&["lock timeout of 2.0s"]);
    assert!(r.elapsed >= Duration::from_secs(2) && r.elapsed < Duration::from_secs(20), "took {:?}", r.elapsed);
    assert!(!out.path().join("t1").exists() && !out.path().join("t2").exists());
    let left: Vec<String> = files_in(out.path()).into_iter().filter(|n| n.contains("staging")).collect();
    assert!(left.is_empty(), "staging left: {left:?}");
    holder.release();
    run_plugin(&d, &["maildir-backup", "-u", "alice", "-t", "2", &in_root(&out.path().join("t3"))]).expect_ok();

    // A bad value is a configuration error.
    run_plugin(&d, &["-o", "maildir_backup_jobs=many", "maildir-backup", "-u", "alice", &in_root(&out.path().join("j"))])
        .expect_code(EX_CONFIG)
        .expect_stderr(&["maildir_backup_jobs"]);
    eprintln!("d24_plugin_settings_overrides_and_lock_timeout: {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------------------
// 10. Cross-release

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
    let (abi23, abi24) = (abi_of(Path::new("/usr/include/dovecot/config.h")), abi_of(&support::trixie::root().join("usr/include/dovecot/config.h")));
    assert_ne!(abi23, abi24);
    let (b23, b24) = (fs::read(&so23).unwrap(), fs::read(&so24).unwrap());
    assert!(contains(&b23, &abi23) && !contains(&b23, &abi24), "{} should carry {abi23}", so23.display());
    assert!(contains(&b24, &abi24) && !contains(&b24, &abi23), "{} should carry {abi24}", so24.display());
    let (m23_dir, m24_dir) = (module_dir_with(&so23), module_dir_with(&so24));
    let (m23, m24) = (m23_dir.path(), m24_dir.path());

    let d24 = Dovecot24::start(DovecotOptions::default());
    populate(&d24, "alice", &["INBOX", "Sent"], 2);
    let d23 = Dovecot::start(DovecotOptions::default());
    populate(&d23, "alice", &["INBOX", "Sent"], 2);

    // 2.3's plugin in 2.4's doveadm.
    let r = run_with_module_dir(&d24, m23, &["-D", "mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(r.stdout.lines().any(|l| l == "Sent"), "{}", r.show());
    assert_refused(&r, "2.3 plugin in 2.4 doveadm");
    let r = run_with_module_dir(&d24, m23, &["mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(!r.stderr.contains("Error") && !r.stderr.contains("Fatal"), "{}", r.show());
    let out24 = tempdir_in_root();
    vmail_dir24(out24.path());
    run_with_module_dir(&d24, m23, &["maildir-backup", "-u", "alice", &in_root(&out24.path().join("x"))]).expect_code(EX_USAGE).expect_stderr(&["usage"]);
    // The 2.4 build from the same kind of module dir loads and works.
    run_with_module_dir(&d24, m24, &["maildir-backup", "-u", "alice", &in_root(&out24.path().join("ok"))]).expect_ok();
    assert_verified(&out24.path().join("ok"));

    // 2.4's plugin in 2.3's doveadm.
    let r = run_with_module_dir(&d23, m24, &["-D", "mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(r.stdout.lines().any(|l| l == "Sent"), "{}", r.show());
    assert_refused(&r, "2.4 plugin in 2.3 doveadm");
    let r = run_with_module_dir(&d23, m24, &["mailbox", "list", "-u", "alice"]);
    r.expect_ok();
    assert!(!r.stderr.contains("Error") && !r.stderr.contains("Fatal"), "{}", r.show());
    let out23 = vmail_tempdir();
    run_with_module_dir(&d23, m24, &["maildir-backup", "-u", "alice", &out23.path().join("x").display().to_string()]).expect_code(EX_USAGE).expect_stderr(&["usage"]);
    run_with_module_dir(&d23, m23, &["maildir-backup", "-u", "alice", &out23.path().join("ok").display().to_string()]).expect_ok();
    assert_verified(&out23.path().join("ok"));
    eprintln!("d24_cross_release_plugins_are_refused_cleanly: {:.1?}", t0.elapsed());
}

/// Dovecot 2.4 whose config process has no maildir_backup settings (our settings module not
/// installed where it looks, here: that dir masked by an empty one in a private mount
/// namespace): the plugin runs with its defaults and says how to install the module.
#[test]
fn d24_plugin_without_its_settings_module_runs_with_defaults() {
    let (so24, _) = plugin24_build();
    let modules = module_dir_with(&so24);
    let empty = tempdir();
    let d = Dovecot24::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent"], 3);
    let out = tempdir_in_root();
    vmail_dir24(out.path());
    let dest = out.path().join("b");
    let settings_dir = support::trixie::root().join(SETTINGS_DIR24_REL);
    fs::create_dir_all(&settings_dir).unwrap();
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c", r#"mount --bind "$0" "$1" && mount --bind "$2" "$3" && shift 3 && exec "$@""#])
        .arg(modules.path())
        .arg(V24::module_dir())
        .arg(empty.path())
        .arg(&settings_dir)
        .args(V24::command_words(V24::DOVEADM_BIN))
        .arg("-c")
        .arg(d.conf_in_root())
        .args(["maildir-backup", "-u", "alice", &in_root(&dest)]);
    let r = Run::of(c);
    r.expect_ok().expect_stderr(&["has no maildir_backup settings", "defaults", "libmaildir_backup_settings.so"]);
    assert_verified(&dest);
}

// ---------------------------------------------------------------------------------------------------------
// 11. Monitoring

/// `-A` over alice and bob into a repository, with the metrics textfile named by `setting` (the
/// release's `-o` key) in `prom` (a directory the mail user can write): one file holds both users,
/// with their manifests' counts, and each series has its run record, so `check` is OK. Then bob's
/// lock is held past a 1 s timeout: his failure (exit 75, one failure) is in the file and makes
/// `check` a WARNING, while alice's new success stands beside it.
fn plugin_writes_metrics_and_run_records<R: PluginRelease>(d: &Instance<R>, setting: &str, repo: &Path, prom: &Path) {
    for user in ["alice", "bob"] {
        populate(d, user, FOLDERS, 4);
    }
    let file = prom.join("maildir-backup.prom");
    let metrics_opt = format!("{setting}={}", R::inside(&file).display());
    let dest = format!("repo:{}", R::inside(repo).display());
    run_plugin(d, &["-o", &metrics_opt, "maildir-backup", "-A", &dest]).expect_ok();
    let m = promtext::read(&file);
    for user in ["alice", "bob"] {
        // By its real name: root refuses the mail user's `latest` link.
        let series = repo.join(user);
        let manifest = read_manifest(&series.join(fs::read_link(series.join("latest")).unwrap()));
        let messages: u64 = manifest.folders.iter().map(|f| f.messages).sum();
        assert_eq!(messages, 16, "{user}");
        assert_eq!(promtext::user_value(&m, "maildir_backup_messages", user), messages as f64, "{user}");
        assert_eq!(promtext::user_value(&m, "maildir_backup_last_run_success", user), 1.0, "{user}");
        assert!(promtext::user_value(&m, "maildir_backup_lock_hold_seconds", user) > 0.0, "{user}");
        assert!(repo.join(user).join("last-run.json").is_file(), "{user}: no run record");
    }
    let repo_s = repo.to_str().unwrap();
    let ok = cli(&["check", repo_s]);
    assert_eq!(ok.code(), Some(0), "{}", ok.show());

    let holder = LockHolder::start(&d.mailbox_path("bob", "INBOX", "control"), 30);
    run_plugin(d, &["-o", &metrics_opt, "maildir-backup", "-A", "-t", "1", &dest]).expect_code(EX_TEMPFAIL);
    holder.release();
    let m = promtext::read(&file);
    assert_eq!(promtext::user_value(&m, "maildir_backup_last_run_success", "bob"), 0.0);
    assert_eq!(promtext::user_value(&m, "maildir_backup_last_run_exit_code", "bob"), f64::from(EX_TEMPFAIL));
    assert_eq!(promtext::user_value(&m, "maildir_backup_failures_total", "bob"), 1.0);
    assert_eq!(promtext::user_value(&m, "maildir_backup_last_run_success", "alice"), 1.0);
    assert_eq!(promtext::user_value(&m, "maildir_backup_failures_total", "alice"), 0.0);
    let warned = cli(&["check", repo_s, "-v"]);
    assert_eq!(warned.code(), Some(1), "{}", warned.show());
    assert!(warned.stdout.contains("bob: last run failed at ") && warned.stdout.contains("(exit 75)"), "{}", warned.show());
}

#[test]
fn plugin_writes_metrics_and_run_records_on_2_3() {
    let d = Dovecot::start(DovecotOptions { users: vec!["alice".into(), "bob".into()], ..Default::default() });
    let out = vmail_tempdir();
    plugin_writes_metrics_and_run_records(&d, "plugin/maildir_backup_metrics", &out.path().join("repo"), &vmail_dir(&out.path().join("prom")));
}

#[test]
fn d24_plugin_writes_metrics_and_run_records() {
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions { users: vec!["alice".into(), "bob".into()], ..Default::default() });
    let out = tempdir_in_root();
    vmail_dir24(out.path());
    plugin_writes_metrics_and_run_records(&d, "maildir_backup_metrics", &out.path().join("repo"), &vmail_dir24(&out.path().join("prom")));
}

// ---------------------------------------------------------------------------------------------------------
// 12. Link snapshots

/// Message files below `root` by relative path: (dev, inode).
fn message_inodes(root: &Path) -> BTreeMap<std::path::PathBuf, (u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    support::repo_helpers::message_files(root)
        .into_iter()
        .map(|f| {
            let md = fs::symlink_metadata(&f).unwrap();
            (f.strip_prefix(root).unwrap().to_path_buf(), (md.dev(), md.ino()))
        })
        .collect()
}

/// `-L`: the backup's messages are alice's own files (hard links), its control files copies, and it
/// verifies; in `out`, a directory the mail user can write on the mail's file system.
fn plugin_link_backup<R: PluginRelease>(d: &Instance<R>, out: &Path) {
    populate(d, "alice", FOLDERS, 5);
    let dest = out.join("alice-linked");
    run_plugin(d, &["maildir-backup", "-u", "alice", "-L", &R::inside(&dest).display().to_string()]).expect_ok();
    assert_verified(&dest);
    let maildir = d.maildir("alice");
    let (source, linked) = (message_inodes(&maildir), message_inodes(&dest));
    assert_eq!(source.len(), FOLDERS.len() * 5);
    assert_eq!(linked, source, "the -L backup's messages are not alice's files");
    let uidlist = |root: &Path| fs::symlink_metadata(root.join("dovecot-uidlist")).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    assert_ne!(uidlist(&dest), uidlist(&maildir));
}

#[test]
fn plugin_link_backup_on_2_3() {
    let d = Dovecot::start(DovecotOptions::default());
    let out = vmail_tempdir();
    plugin_link_backup(&d, out.path());
}

#[test]
fn d24_plugin_link_backup() {
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions::default());
    let out = tempdir_in_root();
    vmail_dir24(out.path());
    plugin_link_backup(&d, out.path());
}

// ---------------------------------------------------------------------------------------------------------
// 13. Hand-off to an offsite tool

/// What a hand-off's command recorded of itself: (real uid, effective uid, user, time), one line a run.
fn hand_off_ids(log: &Path) -> Vec<(u32, u32, String, String)> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            assert_eq!(w.len(), 4, "bad line {l:?} in {}", log.display());
            (w[0].parse().unwrap(), w[1].parse().unwrap(), w[2].to_string(), w[3].to_string())
        })
        .collect()
}

/// `maildir-backup-hand-off -A -s OUT/stage/%u 'SHELL COMMAND'`: every user's link snapshot at their
/// own stage, `tool` run in it as the mail user (real and effective ids both: doveadm -A only
/// seteuid's away from root, which a child could take back) with the user and instant in its
/// environment. bob's command fails with 3: his exit status is doveadm's, and alice and carol (before
/// and after him) are still handed off. No stage is left. `restored(user)` gives back what `tool`
/// stored for a user, which must be exactly their messages, with a manifest that verifies.
/// `settings`: give the stage and command as settings (`-o KEY=VALUE`, `plugin/KEY` on 2.3) rather
/// than as options.
fn plugin_hand_off_all_users<R: PluginRelease>(d: &Instance<R>, out: &Path, settings: Option<&str>, tool: &str, restored: impl Fn(&str) -> std::path::PathBuf) {
    populate_three_users(d);
    let ids = R::inside(&out.join("ids"));
    let command = format!(
        "echo \"$(id -ru) $(id -u) $MAILDIR_BACKUP_USER $MAILDIR_BACKUP_TIME\" >> {}; [ \"$MAILDIR_BACKUP_USER\" != bob ] || exit 3; {tool}",
        ids.display()
    );
    let stage = R::inside(&out.join("stage")).join("%u");
    let args: Vec<String> = match settings {
        None => ["maildir-backup-hand-off", "-A", "-s", s(&stage), &command].map(String::from).to_vec(),
        Some(prefix) => vec![
            "-o".into(),
            format!("{prefix}maildir_backup_stage={}", stage.display()),
            "-o".into(),
            format!("{prefix}maildir_backup_hand_off={command}"),
            "maildir-backup-hand-off".into(),
            "-A".into(),
        ],
    };
    let r = run_plugin(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    r.expect_code(3).expect_stderr(&["user bob", "failed (exit status: 3)"]);
    // Only the hand-offs' lock files (`.USER.maildir-backup-hand-off`) stay.
    let left: Vec<_> = fs::read_dir(out.join("stage")).unwrap().flatten().map(|e| e.file_name()).filter(|n| !n.to_string_lossy().ends_with(".maildir-backup-hand-off")).collect();
    assert!(left.is_empty(), "left in the stage dir: {left:?}\n{}", r.show());

    let (vmail, _) = R::vmail_ids();
    let ran = hand_off_ids(&out.join("ids"));
    let users: BTreeSet<&str> = ran.iter().map(|(_, _, u, _)| u.as_str()).collect();
    assert_eq!(users, BTreeSet::from(["alice", "bob", "carol"]), "{}", r.show());
    for (ruid, euid, user, time) in &ran {
        assert_eq!((*ruid, *euid), (vmail, vmail), "{user}'s command did not run as the mail user only");
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{user}: MAILDIR_BACKUP_TIME {time:?}");
    }
    for user in ["alice", "carol"] {
        let got = restored(user);
        assert_verified(&got);
        let (source, handed) = (message_inodes(&d.maildir(user)), message_inodes(&got));
        assert!(!source.is_empty());
        assert_eq!(handed.keys().collect::<Vec<_>>(), source.keys().collect::<Vec<_>>(), "{user}: handed off messages differ from the source");
    }
}

fn three_users() -> DovecotOptions {
    DovecotOptions { users: ["alice", "bob", "carol"].map(String::from).to_vec(), ..Default::default() }
}

/// 2.3 with the README's restic recipe: a repository the mail user can write, one snapshot per user
/// tagged with the user's name.
#[test]
fn plugin_hands_all_users_to_restic_on_2_3() {
    let d = Dovecot::start(three_users());
    let out = tempdir();
    let repo = out.path().join("restic");
    fs::write(out.path().join("pw"), "test").unwrap();
    let mut init = Command::new("restic");
    init.args(["init", "-q", "--password-file"]).arg(out.path().join("pw")).arg("-r").arg(&repo);
    Run::of(init).expect_ok();
    chown_vmail_recursive(out.path());
    let tool = format!(
        "restic -q -r {0}/restic --password-file {0}/pw --cache-dir {0}/cache backup --ignore-ctime --host mail --tag \"$MAILDIR_BACKUP_USER\" .",
        out.path().display()
    );
    plugin_hand_off_all_users(&d, out.path(), None, &tool, |user| {
        let into = out.path().join(format!("restored-{user}"));
        let mut c = Command::new("restic");
        c.args(["-q", "--password-file"]).arg(out.path().join("pw")).arg("-r").arg(&repo);
        c.args(["restore", "latest", "--host", "mail", "--tag", user, "--target"]).arg(&into);
        Run::of(c).expect_ok();
        into
    });
}

/// 2.4, with the stage and command from its settings and tar (in the Debian 13 root doveadm runs in)
/// as the tool.
#[test]
fn d24_plugin_hands_all_users_to_a_tool() {
    install_plugin24();
    let d = Dovecot24::start(three_users());
    let out = tempdir_in_root();
    vmail_dir24(out.path());
    let tool = format!("tar -cf {}/\"$MAILDIR_BACKUP_USER\".tar .", in_root(out.path()));
    plugin_hand_off_all_users(&d, out.path(), Some(""), &tool, |user| {
        let into = out.path().join(format!("restored-{user}"));
        fs::create_dir(&into).unwrap();
        let mut c = Command::new("tar");
        c.arg("-xf").arg(out.path().join(format!("{user}.tar"))).arg("-C").arg(&into);
        Run::of(c).expect_ok();
        into
    });
}
