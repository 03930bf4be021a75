//! `restore` from a repository snapshot into a real Dovecot's Maildirs (2.3; 2.4 for CLI and plugin).
//!
//! - `full_restore_into_a_new_user_keeps_uids_flags_and_uidvalidity`: a snapshot of alice (four folders, UID
//!   gaps from expunges, keywords) restored into the not yet existing Maildir of a new user carol: Dovecot
//!   shows carol, folder by folder, the same UIDs, Message-IDs, flags (keywords included), UIDVALIDITY and
//!   UIDNEXT as alice had when the snapshot was taken.
//! - `merge_restore_of_single_messages_into_a_live_mailbox`: with an IMAP client connected and SELECTed,
//!   messages expunged after the snapshot are restored by unique name (--message) and by snapshot UID
//!   (--uid); the client sees them appear after NOOP with their flags ($Work included), every pre-existing
//!   (UID, Message-ID, flags) is unchanged, and the same restores again restore nothing.
//! - `merge_restore_of_a_recreated_folder_remaps_keywords`: a folder deleted and recreated after the snapshot,
//!   where "Zeta" now has the letter `a` that $Work had, is restored with --folder into it while a client has
//!   it SELECTed: the client sees every message with its keywords by name; existing letters stay; again = no-op.
//! - `dry_run_lists_and_changes_nothing`: --dry-run (merge and full) reports what it would do and leaves the
//!   target byte-for-byte, mtime-for-mtime as it was.
//! - `bad_input_is_refused_with_clear_errors_and_the_target_untouched`: a directory that is not a snapshot
//!   (66), a folder / UID / unique name that the snapshot lacks or a malformed --uid (64), a target that is
//!   not a Maildir (65), a snapshot with a corrupted message (65): each error names the culprit and the
//!   target is untouched.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use support::churn;
use support::procs::{files_in, mb};
use support::readback::{assert_verified, fetch, mailbox_status, mailboxes, vmail_dir24};
use support::plugin::{install_plugin24, run_plugin};
use support::repo_helpers::*;
use support::trixie::{chown_vmail_recursive_root, in_root, tempdir_in_root};
use support::*;

const USER: &str = "alice";

fn restore(snapshot: &Path, target: &str, extra: &[&str]) -> Run {
    let mut a = vec!["restore".to_string(), snapshot.display().to_string(), target.to_string()];
    a.extend(extra.iter().map(|s| s.to_string()));
    cli(&a)
}

fn restore_json(snapshot: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let mut x = extra.to_vec();
    x.push("--json");
    let r = restore(snapshot, target, &x);
    assert_eq!(r.code(), Some(0), "{}", r.show());
    r.json()
}

/// uid → (Message-ID, flags) of every folder, seen through IMAP.
fn imap_view(d: &Dovecot, user: &str, folders: &[&str]) -> BTreeMap<String, BTreeMap<u32, (String, String)>> {
    let mut imap = d.imap(user);
    let mut out = BTreeMap::new();
    for f in folders {
        imap.examine(f).unwrap_or_else(|e| panic!("EXAMINE {f} as {user}: {e}\n{}", d.log_tail()));
        out.insert(f.to_string(), mid_flags(&mut imap));
    }
    imap.logout();
    out
}

#[test]
fn full_restore_into_a_new_user_keeps_uids_flags_and_uidvalidity() {
    let t0 = Instant::now();
    const FOLDERS: &[&str] = &["INBOX", "Archive", "Lists", "Lists.Rust"];
    let d = start_with_users(&[USER]);
    populate(&d, USER, FOLDERS, 60);
    // UID gaps, so "same UIDs" means more than 1..n.
    let mut imap = d.imap(USER);
    imap.select("Archive").unwrap();
    imap.uid_expunge("3,10:12,40").unwrap();
    imap.select("INBOX").unwrap();
    imap.uid_expunge("7").unwrap();
    imap.uid_store("1:5", "+FLAGS", "$Later").unwrap();
    imap.logout();

    let uid_flags: BTreeMap<&str, Vec<(u32, String)>> = FOLDERS.iter().map(|f| (*f, d.fetch_uid_flags(USER, f, None))).collect();
    let view = imap_view(&d, USER, FOLDERS);
    let status = |user: &str, f: &str| (mailbox_status(&d, user, "uidvalidity", f), mailbox_status(&d, user, "uidnext", f));
    let alice_status: BTreeMap<&str, (u64, u64)> = FOLDERS.iter().map(|f| (*f, status(USER, f))).collect();
    assert!(uid_flags["INBOX"].iter().any(|(_, f)| f.contains("$Work")) && uid_flags["INBOX"].iter().any(|(_, f)| f.contains("$Later")));
    assert!(!uid_flags["Archive"].iter().any(|(u, _)| *u == 3 || *u == 11));
    let total: usize = uid_flags.values().map(Vec::len).sum();

    let repo = tempdir();
    let (snap, _) = take_snapshot(&d.mail_location(USER), repo.path(), USER, &[]);

    d.add_user("carol");
    let target = d.maildir("carol");
    assert!(!target.exists() && !target.parent().unwrap().exists(), "carol's Maildir must not exist yet");
    let j = restore_json(&snap, &target.display().to_string(), &[]);
    assert_eq!(j["mode"], "full", "{j}");
    assert_eq!(j["restored"].as_u64(), Some(total as u64), "{j}");
    assert_eq!(j["skipped"].as_u64(), Some(0), "{j}");
    assert!(j["warnings"].as_array().unwrap().is_empty(), "{j}");
    assert!(churn::files_under_tmp(&target).is_empty(), "restore left files in tmp/");
    chown_vmail_recursive(&d.dir().join("mail/carol"));

    for f in FOLDERS {
        assert_eq!(d.fetch_uid_flags("carol", f, None), uid_flags[f], "doveadm fetch uid flags of {f}: carol differs from alice at snapshot time");
        assert_eq!(status("carol", f), alice_status[f], "(uidvalidity, uidnext) of {f}");
    }
    assert_eq!(imap_view(&d, "carol", FOLDERS), view, "IMAP view (uid → Message-ID, flags) differs");
    let list = d.doveadm_ok(&["mailbox", "list", "-u", "carol"]);
    let listed: BTreeSet<&str> = list.lines().map(str::trim).collect();
    for f in FOLDERS {
        assert!(listed.contains(f), "{f} not in carol's mailbox list:\n{list}");
    }
    // New mail continues the UID sequence.
    d.deliver("carol", None, &message(5555, 600));
    let after = d.fetch_uid_flags("carol", "INBOX", None);
    assert_eq!(after.last().unwrap().0 as u64, alice_status["INBOX"].1, "the first new UID must be alice's UIDNEXT");
    eprintln!("full restore: {total} messages, {:.1?}", t0.elapsed());
}

/// The (Message-ID, flags) checks after a merge: every pre-existing UID unchanged, the new UIDs above
/// the old ones, and the new messages exactly `want_new`.
fn check_merge(pre: &BTreeMap<u32, (String, String)>, after: &BTreeMap<u32, (String, String)>, want_new: BTreeSet<(String, String)>, what: &str) {
    for (uid, v) in pre {
        assert_eq!(after.get(uid), Some(v), "{what}: pre-existing uid {uid} lost or changed");
    }
    let max_pre = pre.keys().max().copied().unwrap_or(0);
    let new: BTreeSet<(String, String)> = after
        .iter()
        .filter(|(u, _)| !pre.contains_key(u))
        .map(|(u, v)| {
            assert!(*u > max_pre, "{what}: new uid {u} is not above the old ones");
            v.clone()
        })
        .collect();
    assert_eq!(new.len(), after.len() - pre.len(), "{what}: duplicate restored messages");
    assert_eq!(new, want_new, "{what}: restored messages (Message-ID, flags)");
}

fn flags_of(m: &BTreeMap<u32, (String, String)>) -> Vec<(u32, String)> {
    m.iter().map(|(u, (_, f))| (*u, f.clone())).collect()
}

/// Waits until the wall clock is just past a whole second, so that what follows (well under a second of
/// work) happens within one second, as it can on a busy server: Dovecot notices a rewritten
/// dovecot-keywords only by its mtime in whole seconds.
fn start_of_a_second() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    std::thread::sleep(std::time::Duration::from_nanos(1_000_000_000 - u64::from(now.subsec_nanos()) + 20_000_000));
}

#[test]
fn merge_restore_of_single_messages_into_a_live_mailbox() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive"], 60);
    let target = d.mail_location(USER);
    let root = d.maildir(USER);

    // A client SELECTs INBOX; the snapshot is taken; then the client expunges four messages.
    let mut a = d.imap(USER);
    a.select("INBOX").unwrap();
    let snap_view = mid_flags(&mut a);
    assert!(snap_view[&12].1.contains("$Work") && snap_view[&23].1.contains("$Work"), "{:?}", (&snap_view[&12], &snap_view[&23]));
    let repo = tempdir();
    let (snap, _) = take_snapshot(&target, repo.path(), USER, &[]);
    a.uid_expunge("5,12,23,30").unwrap();
    let pre = mid_flags(&mut a);
    assert_eq!(pre.len(), 56);
    let archive_before = d.fetch_uid_flags(USER, "Archive", None);

    // Restore one by unique name, two by their UIDs in the snapshot (those taking the folder's
    // lock as Dovecot's dotlock_use_excl and mail_nfs_storage would).
    let snap_uniques = uidlist_uniques(&snap);
    let j = restore_json(&snap, &target, &["--message", &snap_uniques[&5]]);
    assert_eq!((j["mode"].as_str(), j["restored"].as_u64(), j["skipped"].as_u64()), (Some("merge"), Some(1), Some(0)), "{j}");
    let j = restore_json(&snap, &target, &["--uid", "INBOX:12", "--uid", "INBOX:23", "--excl-lock", "--nfs", "--stale-timeout", "30"]);
    assert_eq!((j["restored"].as_u64(), j["skipped"].as_u64()), (Some(2), Some(0)), "{j}");
    assert!(j["warnings"].as_array().unwrap().is_empty(), "{j}");
    assert!(churn::files_under_tmp(&root).is_empty(), "restore left files in tmp/");

    // The SELECTed client sees them after NOOP, with their flags ($Work included); nothing else changed.
    a.noop().unwrap();
    let after = mid_flags(&mut a);
    check_merge(&pre, &after, [5, 12, 23].iter().map(|u| snap_view[u].clone()).collect(), "INBOX");
    assert!(!after.values().any(|(m, _)| *m == snap_view[&30].0), "uid 30 was not asked for");
    assert_eq!(d.fetch_uid_flags(USER, "INBOX", None), flags_of(&after), "doveadm disagrees with the IMAP view");
    assert_eq!(d.fetch_uid_flags(USER, "Archive", None), archive_before, "another folder changed");

    // The same restores again: nothing to do, nothing changes.
    let j = restore_json(&snap, &target, &["--message", &snap_uniques[&5]]);
    assert_eq!((j["restored"].as_u64(), j["skipped"].as_u64()), (Some(0), Some(1)), "second --message restore: {j}");
    let j = restore_json(&snap, &target, &["--uid", "INBOX:12", "--uid", "INBOX:23"]);
    assert_eq!((j["restored"].as_u64(), j["skipped"].as_u64()), (Some(0), Some(2)), "second --uid restore: {j}");
    a.noop().unwrap();
    assert_eq!(mid_flags(&mut a), after, "INBOX changed on the second restore");
    a.logout();
    eprintln!("merge restore of messages: {:.1?}", t0.elapsed());
}

#[test]
fn merge_restore_of_a_recreated_folder_remaps_keywords() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive"], 60);
    let target = d.mail_location(USER);
    let root = d.maildir(USER);

    let mut b = d.imap(USER);
    b.select("Archive").unwrap();
    let snap_view = mid_flags(&mut b);
    let repo = tempdir();
    let (snap, _) = take_snapshot(&target, repo.path(), USER, &[]);
    let inbox_before = d.fetch_uid_flags(USER, "INBOX", None);

    // Archive is deleted by accident and recreated; a new message with the keywords "Zeta" and "$Later"
    // arrives first, so the target's letters differ from the snapshot's ($Work is `a` there, Zeta is `a`
    // here). The client SELECTs the new Archive.
    b.command("CLOSE").unwrap();
    b.command("DELETE \"Archive\"").unwrap();
    b.create("Archive").unwrap();
    start_of_a_second();
    b.append("Archive", "Zeta $Later", &message(70_001, 800)).unwrap();
    b.append("Archive", "\\Seen", &message(70_002, 900)).unwrap();
    b.select("Archive").unwrap();
    let archive_dir = folder_dir(&root, "Archive");
    let kw_before = churn::read_keywords(&archive_dir);
    assert_eq!(kw_before.get(&0).map(String::as_str), Some("Zeta"), "{kw_before:?}");
    assert_eq!(churn::read_keywords(&folder_dir(&snap, "Archive")).get(&0).map(String::as_str), Some("$Work"));
    let pre = mid_flags(&mut b);
    assert_eq!(pre.len(), 2);

    let j = restore_json(&snap, &target, &["--folder", "Archive"]);
    assert_eq!((j["mode"].as_str(), j["restored"].as_u64(), j["skipped"].as_u64(), j["folders_created"].as_u64()), (Some("merge"), Some(60), Some(0), Some(0)), "{j}");
    assert!(j["warnings"].as_array().unwrap().is_empty(), "{j}");
    assert!(churn::files_under_tmp(&root).is_empty(), "restore left files in tmp/");

    // The SELECTed client sees all 60 after NOOP, keywords by name ($Work, not "unknown-N").
    b.noop().unwrap();
    let after = mid_flags(&mut b);
    check_merge(&pre, &after, snap_view.values().cloned().collect(), "Archive");
    assert!(after.values().filter(|(_, f)| f.contains("$Work")).count() >= 5);
    let kw_after = churn::read_keywords(&archive_dir);
    assert_eq!((kw_after.get(&0), kw_after.get(&1)), (kw_before.get(&0), kw_before.get(&1)), "existing keyword letters must not move: {kw_after:?}");
    assert!(kw_after.values().any(|k| k == "$Work"), "{kw_after:?}");
    assert_eq!(d.fetch_uid_flags(USER, "Archive", None), flags_of(&after), "doveadm disagrees with the IMAP view");
    assert_eq!(d.fetch_uid_flags(USER, "INBOX", None), inbox_before, "another folder changed");

    // Again: all skipped, nothing changes.
    let j = restore_json(&snap, &target, &["--folder", "Archive"]);
    assert_eq!((j["restored"].as_u64(), j["skipped"].as_u64()), (Some(0), Some(60)), "second --folder restore: {j}");
    b.noop().unwrap();
    assert_eq!(mid_flags(&mut b), after, "Archive changed on the second restore");
    b.logout();
    eprintln!("merge restore of a folder: {:.1?}", t0.elapsed());
}

#[test]
fn dry_run_lists_and_changes_nothing() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive"], 30);
    let target = d.mail_location(USER);
    let root = d.maildir(USER);
    let repo = tempdir();
    let (snap, _) = take_snapshot(&target, repo.path(), USER, &[]);
    let mut a = d.imap(USER);
    a.select("INBOX").unwrap();
    a.uid_expunge("2,4,6").unwrap();
    let pre = mid_flags(&mut a);

    let before = tree_listing(&root);
    let j = restore_json(&snap, &target, &["--dry-run"]);
    assert_eq!((j["mode"].as_str(), j["restored"].as_u64(), j["skipped"].as_u64()), (Some("merge"), Some(3), Some(57)), "{j}");
    let actions: Vec<&str> = j["actions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(actions.len(), 60, "{j}");
    assert_eq!(actions.iter().filter(|a| a.starts_with("restore ")).count(), 3, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| a.starts_with("skip ")).count(), 57, "{actions:?}");
    // The plain output lists the actions too.
    let r = restore(&snap, &target, &["--dry-run", "--folder", "INBOX"]);
    assert_eq!(r.code(), Some(0), "{}", r.show());
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("restore ")).count(), 3, "{}", r.show());
    assert!(r.stdout.contains("3 would be restored"), "{}", r.show());
    assert_same_tree(&before, &tree_listing(&root), "restore --dry-run into a live Maildir");
    a.noop().unwrap();
    assert_eq!(mid_flags(&mut a), pre);

    // A dry full restore into a new place creates nothing.
    let fresh = tempdir();
    let new_target = fresh.path().join("x/Maildir");
    let j = restore_json(&snap, &new_target.display().to_string(), &["--dry-run"]);
    assert_eq!((j["mode"].as_str(), j["restored"].as_u64()), (Some("full"), Some(60)), "{j}");
    assert!(fs::read_dir(fresh.path()).unwrap().next().is_none(), "dry run created something");
    a.logout();
    eprintln!("dry run: {:.1?}", t0.elapsed());
}

#[test]
fn bad_input_is_refused_with_clear_errors_and_the_target_untouched() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive"], 20);
    let target = d.mail_location(USER);
    let root = d.maildir(USER);
    let repo = tempdir();
    let (snap, _) = take_snapshot(&target, repo.path(), USER, &[]);
    let series = snap.parent().unwrap().to_path_buf();
    let before = tree_listing(&root);
    let scratch = tempdir();
    let fresh = scratch.path().join("fresh/Maildir");

    // Expect `code`, an error naming every one of `names`, and the targets untouched.
    let refuse = |snapshot: &Path, extra: &[&str], code: i32, names: &[&str]| {
        for t in [target.clone(), fresh.display().to_string()] {
            let r = restore(snapshot, &t, extra);
            assert_eq!(r.code(), Some(code), "{}", r.show());
            assert!(r.stdout.trim().is_empty(), "nothing on stdout on failure:\n{}", r.show());
            for n in names {
                assert!(r.stderr.contains(n), "the error must name {n:?}:\n{}", r.show());
            }
            assert_same_tree(&before, &tree_listing(&root), &r.cmdline);
            assert!(!fresh.parent().unwrap().exists(), "{}: created the target", r.cmdline);
        }
    };

    // Not a snapshot: the series directory (an easy mistake), a Maildir, a missing path.
    refuse(&series, &[], 66, &[&series.display().to_string(), "not a maildir-backup backup or snapshot"]);
    refuse(&root, &[], 66, &[&root.display().to_string()]);
    refuse(&scratch.path().join("nope"), &[], 66, &["nope"]);

    // Things the snapshot does not have, or a malformed --uid.
    refuse(&snap, &["--folder", "Nope"], 64, &["\"Nope\"", "INBOX", "Archive"]);
    refuse(&snap, &["--folder", "INBOX", "--folder", "Trash"], 64, &["\"Trash\""]);
    refuse(&snap, &["--uid", "INBOX:9999"], 64, &["9999", "INBOX"]);
    refuse(&snap, &["--uid", "Nope:1"], 64, &["\"Nope\""]);
    refuse(&snap, &["--uid", "INBOX"], 64, &["\"INBOX\"", "FOLDER:UID"]);
    refuse(&snap, &["--uid", "INBOX:x"], 64, &["\"INBOX:x\""]);
    refuse(&snap, &["--message", "1700000000.M1P1.nohost"], 64, &["1700000000.M1P1.nohost"]);

    // A target that is not a Maildir.
    let notmail = scratch.path().join("notmail");
    fs::create_dir_all(notmail.join("sub")).unwrap();
    fs::write(notmail.join("notes.txt"), b"not mail\n").unwrap();
    fs::write(notmail.join("sub/x"), b"x\n").unwrap();
    let nm_before = tree_listing(&notmail);
    let r = restore(&snap, &notmail.display().to_string(), &[]);
    assert_eq!(r.code(), Some(65), "{}", r.show());
    assert!(r.stderr.contains(&notmail.display().to_string()) && r.stderr.contains("not a Maildir"), "{}", r.show());
    assert_same_tree(&nm_before, &tree_listing(&notmail), "restore into a non-Maildir");

    // A snapshot whose message file was corrupted (same size, other bytes).
    let m = read_manifest(&snap);
    let victim = m.messages.iter().find(|x| x.folder == ".Archive").unwrap().path_in(&snap);
    flip_bytes(&victim);
    let vname = victim.file_name().unwrap().to_string_lossy().into_owned();
    refuse(&snap, &[], 65, &[&vname, "nothing was restored"]);
    refuse(&snap, &["--folder", "Archive"], 65, &[&vname]);
    // Only what is selected is checked: INBOX alone can still be restored (into a new place).
    let elsewhere = scratch.path().join("elsewhere/Maildir");
    let j = restore_json(&snap, &elsewhere.display().to_string(), &["--folder", "INBOX"]);
    assert_eq!(j["restored"].as_u64(), Some(20), "{j}");
    assert!(!PathBuf::from(&elsewhere).join(".Archive").exists());
    eprintln!("bad input: {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------------------
// Dovecot 2.4: the CLI's full restore, and the plugin's merge restore

/// A snapshot from `backup --repo` restored with the CLI into a new 2.4 user's (missing) Maildir, then
/// chowned to vmail: 2.4 lists the same mailboxes with the same UIDs, GUIDs, flags and keywords, the same
/// UIDVALIDITY and UIDNEXT, and IMAP shows the same Message-ID under every UID.
#[test]
fn d24_full_restore_into_a_fresh_user() {
    let t0 = Instant::now();
    let d = Dovecot24::start(DovecotOptions::default());
    let folders = ["INBOX", "Sent", "Archive.2024"];
    populate(&d, "alice", &folders, 15);
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

    let src = mailboxes(&d, "alice", None);
    let dst = mailboxes(&d, "fresh", None);
    assert_eq!(src.keys().collect::<Vec<_>>(), dst.keys().collect::<Vec<_>>());
    for name in src.keys() {
        let a = fetch(&d, "alice", name, None);
        assert!(!a.is_empty(), "{name}");
        assert_eq!(a, fetch(&d, "fresh", name, None), "{name}: alice (left) vs the restored user (right)");
        for field in ["uidvalidity", "uidnext", "messages"] {
            assert_eq!(mailbox_status(&d, "alice", field, name), mailbox_status(&d, "fresh", field, name), "{name}: {field}");
        }
    }
    let inbox = fetch(&d, "fresh", "INBOX", None);
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
    d.assert_clean_log();
    eprintln!("d24_full_restore_into_a_fresh_user: {:.1?}", t0.elapsed());
}

/// alice (INBOX, Sent; 10 messages each) snapshotted by the plugin into `repo:`, then INBOX 1:3 and Sent 5
/// expunged. Returns the instance, its temp dir, the `repo:` argument and, per folder, the messages before
/// the expunge (uid → (Message-ID, flags)).
fn snapshot_then_expunge() -> (Dovecot24, tempfile::TempDir, String, BTreeMap<&'static str, BTreeMap<u32, (String, String)>>) {
    install_plugin24();
    let d = Dovecot24::start(DovecotOptions::default());
    populate(&d, "alice", &["INBOX", "Sent"], 10);
    let out = tempdir_in_root();
    let repo = vmail_dir24(&out.path().join("repo"));
    let repo_arg = format!("repo:{}", in_root(&repo));
    run_plugin(&d, &["maildir-backup", "-u", "alice", &repo_arg]).expect_ok();
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
    let r = run_plugin(&d, &["-f", "json", "maildir-backup-restore", "-u", "alice", &repo_arg]);
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
    d.assert_clean_log();
    eprintln!("d24_plugin_restore_merges_expunged_messages: {:.1?} (restore {:.2?})", t0.elapsed(), r.elapsed);
}

/// Running the same merge restore twice must not restore anything the second time (no duplicates).
#[test]
fn d24_plugin_restore_twice_adds_nothing() {
    let t0 = Instant::now();
    let (d, _out, repo_arg, before) = snapshot_then_expunge();
    let r1 = run_plugin(&d, &["-f", "json", "maildir-backup-restore", "-u", "alice", &repo_arg]);
    r1.expect_ok();
    assert_eq!(restored_count(&r1), 4, "{}", r1.show());
    let r2 = run_plugin(&d, &["-f", "json", "maildir-backup-restore", "-u", "alice", &repo_arg]);
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
