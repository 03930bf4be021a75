//! Users browse their own snapshots as read-only IMAP folders: the repository's IMAP view
//! (`backup --repo --imap-view`, kept by every snapshot and prune) shown by the namespace recipe of
//! `dovecot-conf/2.x/95-maildir-backup.conf`, uncommented as written, in real Dovecot 2.3 and 2.4,
//! through real IMAP sessions.
//!
//! - `*_snapshots_as_imap_folders`: three nightly snapshots with an expunge, a flag change and a
//!   folder deletion between them: alice's LIST shows the three with their folders as they were, each
//!   folder the UIDs and flags of its night; bob sees only his. STORE, EXPUNGE, APPEND, CREATE,
//!   DELETE and RENAME in the tree change nothing (every file of the repository's snapshots and view
//!   hashed before and after; every snapshot verifies). UID COPY brings back the expunged message and
//!   the deleted folder, with their flags, into the live mailbox, which then backs up and verifies.
//!   After `prune --keep-last 2` the oldest is gone from LIST, and while a backup waits for a lock
//!   held by "another session", LIST never shows a snapshot it has not finished.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::churn::scan_message_ids;
use support::procs::mb;
use support::readback::assert_verified;
use support::*;

/// The folders alice starts with (Maildir++ names); the view shows them below each snapshot.
const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive.2024"];
/// The recipe's repository path, replaced by the test's.
const RECIPE_REPO: &str = "/var/backups/maildir-backup";

/// The snapshot namespace of the release's example config, uncommented, for `repo` (a path as
/// Dovecot sees it); on 2.3 also the ACL file it names, written as its comment says.
fn recipe(release: &str, repo: &Path, acl_file: &Path) -> String {
    let example = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("dovecot-conf/{release}/95-maildir-backup.conf"))).unwrap();
    let section = &example[example.find("## --- Users' own snapshots").expect("the recipe section")..];
    let acl: String = section.lines().filter_map(|l| l.strip_prefix("##   Snapshots")).map(|rest| format!("Snapshots{rest}\n")).collect();
    if !acl.is_empty() {
        fs::write(acl_file, acl).unwrap();
    }
    section
        .lines()
        .filter(|l| l.starts_with('#') && !l.starts_with("##"))
        .map(|l| format!("{}\n", &l[1..]))
        .collect::<String>()
        .replace(RECIPE_REPO, &repo.display().to_string())
        .replace("/etc/dovecot/maildir-backup-snapshots.acl", &acl_file.display().to_string())
}

/// `backup --repo REPO --name USER --imap-view`; returns the new snapshot's name.
fn snapshot<R: Release>(d: &Instance<R>, repo: &Path, user: &str) -> String {
    let r = cli(&["backup", "-q", "--json", "--repo", &repo.display().to_string(), "--name", user, "--imap-view", &d.maildir(user).display().to_string()]);
    r.expect_ok();
    let dest: PathBuf = serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["destination"].as_str().unwrap().into();
    dest.file_name().unwrap().to_string_lossy().into_owned()
}

/// Folder → (UID, flags), as Dovecot shows `user`'s live folders now.
fn live_state<R: Release>(d: &Instance<R>, user: &str, folders: &[&str]) -> BTreeMap<String, Vec<(u32, String)>> {
    folders.iter().map(|f| (f.to_string(), d.fetch_uid_flags(user, f, None))).collect()
}

/// The mailboxes LIST shows under `Snapshots.`, grouped: snapshot → its folders.
fn listed(imap: &mut Imap) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in imap.command("LIST \"\" \"Snapshots.*\"").unwrap() {
        let Some(name) = l.strip_prefix("* LIST ").and_then(|r| r.rsplit(' ').next()) else { continue };
        let name = name.trim_matches('"');
        let rest = name.strip_prefix("Snapshots.").unwrap_or_else(|| panic!("{name} listed under Snapshots."));
        let (snap, folder) = rest.split_once('.').unwrap_or((rest, ""));
        let entry = out.entry(snap.to_string()).or_default();
        if !folder.is_empty() && !l.contains("\\Noselect") {
            entry.insert(folder.to_string());
        }
    }
    out
}

/// Every file below the repository's snapshots and the view's mail part: relative path →
/// (inode, content hash). The view's control part is Dovecot's to write.
fn repo_files(repo: &Path) -> BTreeMap<PathBuf, (u64, blake3::Hash)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![repo.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            if p.ends_with("imap-view/control") {
                continue;
            }
            if md.is_dir() {
                todo.push(p);
            } else if md.is_file() {
                out.insert(p.strip_prefix(repo).unwrap().to_path_buf(), (md.ino(), blake3::hash(&fs::read(&p).unwrap())));
            }
        }
    }
    out
}

fn expect_no(r: Result<Vec<String>, String>, what: &str) {
    assert!(r.is_err(), "{what} was accepted: {r:?}");
}

fn snapshots_as_imap_folders<R: Release>(d: &Instance<R>, repo: &Path) {
    for u in ["alice", "bob"] {
        populate(d, u, FOLDERS, 4);
    }
    // Night 1.
    let s1 = snapshot(d, repo, "alice");
    let bob_snap = snapshot(d, repo, "bob");
    let night1 = live_state(d, "alice", FOLDERS);
    let ids1 = scan_message_ids(&d.maildir("alice"));
    // Day 2: an expunge, a flag change, a folder deleted.
    let expunged_uid = night1["INBOX"][0].0;
    d.doveadm_ok(&["expunge", "-u", "alice", "mailbox", "INBOX", "uid", &expunged_uid.to_string()]);
    d.doveadm_ok(&["flags", "add", "-u", "alice", "\\Flagged", "mailbox", "Sent", "uid", &night1["Sent"][1].0.to_string()]);
    d.doveadm_ok(&["mailbox", "delete", "-u", "alice", "Archive.2024"]);
    let s2 = snapshot(d, repo, "alice");
    let night2 = live_state(d, "alice", &FOLDERS[..2]);
    // Day 3: one more message.
    d.imap("alice").append("INBOX", "", &message(3, 300)).unwrap();
    let s3 = snapshot(d, repo, "alice");
    let night3 = live_state(d, "alice", &FOLDERS[..2]);

    let mut imap = d.imap("alice");
    let all: BTreeSet<String> = FOLDERS.iter().map(|f| f.to_string()).collect();
    let two: BTreeSet<String> = FOLDERS[..2].iter().map(|f| f.to_string()).collect();
    let want: BTreeMap<String, BTreeSet<String>> = [(s1.clone(), all), (s2.clone(), two.clone()), (s3.clone(), two.clone())].into();
    assert_eq!(listed(&mut imap), want, "alice's LIST");
    for (snap, state) in [(&s1, &night1), (&s2, &night2), (&s3, &night3)] {
        for (folder, uid_flags) in state {
            imap.select(&format!("Snapshots.{snap}.{folder}")).unwrap();
            assert_eq!(&imap.uid_fetch_flags("1:*").unwrap(), uid_flags, "Snapshots.{snap}.{folder}");
        }
    }
    let mut bob = d.imap("bob");
    assert_eq!(listed(&mut bob).keys().collect::<Vec<_>>(), [&bob_snap], "bob's LIST");
    assert!(listed(&mut d.imap("carol")).is_empty(), "carol, who has no snapshot, has a Snapshots folder");
    bob.select(&format!("Snapshots.{bob_snap}.INBOX")).unwrap();
    assert_eq!(bob.uid_fetch_flags("1:*").unwrap(), d.fetch_uid_flags("bob", "INBOX", None), "bob's snapshot is his");

    // Nothing changes a snapshot.
    let before = repo_files(repo);
    let sent = format!("Snapshots.{s1}.Sent");
    imap.select(&sent).unwrap();
    let _ = imap.command("UID STORE 1:* +FLAGS (\\Deleted \\Seen)");
    let _ = imap.command("EXPUNGE");
    assert_eq!(imap.uid_fetch_flags("1:*").unwrap(), night1["Sent"], "{sent} after STORE and EXPUNGE");
    imap.command("UNSELECT").unwrap();
    expect_no(imap.append(&sent, "", b"Subject: x\r\n\r\nx\r\n").map(|_| vec![]), "APPEND into a snapshot");
    expect_no(imap.command(&format!("CREATE \"Snapshots.{s1}.New\"")), "CREATE in a snapshot");
    expect_no(imap.command("CREATE \"Snapshots.New\""), "CREATE of a snapshot");
    expect_no(imap.command(&format!("DELETE \"{sent}\"")), "DELETE of a snapshot folder");
    expect_no(imap.command(&format!("DELETE \"Snapshots.{s1}\"")), "DELETE of a snapshot");
    expect_no(imap.command(&format!("RENAME \"{sent}\" \"Mine\"")), "RENAME out of a snapshot");
    expect_no(imap.command(&format!("RENAME \"Sent\" \"Snapshots.{s1}.Mine\"")), "RENAME into a snapshot");
    assert_eq!(repo_files(repo), before, "the repository changed");
    assert_eq!(listed(&mut imap), want, "alice's LIST after the attempts");

    // COPY out: the expunged message, and the deleted folder whole.
    imap.select(&format!("Snapshots.{s1}.INBOX")).unwrap();
    imap.uid_copy(&expunged_uid.to_string(), "INBOX").unwrap();
    imap.create("Archive.2024").unwrap();
    imap.select(&format!("Snapshots.{s1}.Archive.2024")).unwrap();
    imap.uid_copy("1:*", "Archive.2024").unwrap();
    let restored = scan_message_ids(&d.maildir("alice"));
    let day3: Vec<&String> = restored.keys().filter(|k| !ids1.contains_key(*k)).collect();
    assert_eq!(day3.len(), 1, "alice's mail after the COPYs is night 1's and day 3's message: {day3:?}");
    assert!(ids1.keys().all(|k| restored.get(k).map(Vec::len) == Some(1)), "a message of night 1 is missing or twice");
    let flags = |v: &[(u32, String)]| v.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>();
    assert_eq!(flags(&d.fetch_uid_flags("alice", "Archive.2024", None)), flags(&night1["Archive.2024"]), "the restored folder's flags");
    assert_eq!(d.fetch_uid_flags("alice", "INBOX", None).last().unwrap().1, night1["INBOX"][0].1, "the restored message's flags");
    // The live mailbox is one Dovecot and we read as whole.
    let check = tempdir();
    cli_ok(&["backup", "-q", &d.maildir("alice").display().to_string(), &check.path().join("b").display().to_string()]);
    assert_verified(&check.path().join("b"));

    // prune: the oldest leaves the view (and its links with it).
    cli_ok(&["prune", &repo.join("alice").display().to_string(), "--keep-last", "2"]);
    assert_eq!(listed(&mut imap).keys().cloned().collect::<Vec<_>>(), [s2.clone(), s3.clone()], "LIST after prune");
    assert!(!repo.join("alice/imap-view/mail").join(&s1).exists() && !repo.join("alice/imap-view/control").join(&s1).exists());

    // A backup that waits for a lock: no snapshot shows before it is whole.
    let lock = fake_uidlist_lock(&d.maildir("alice"));
    let mut run = mb();
    run.args(["backup", "-q", "--repo"]).arg(repo).args(["--name", "alice", "--lock-timeout", "60"]).arg(d.maildir("alice"));
    let mut child = run.spawn().unwrap();
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(listed(&mut imap));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen.iter().all(|l| l.keys().collect::<Vec<_>>() == [&s2, &s3]), "a snapshot showed while its backup waited: {seen:?}");
    drop(lock);
    while child.try_wait().unwrap().is_none() {
        seen.push(listed(&mut imap));
    }
    assert!(child.wait().unwrap().success());
    let last = listed(&mut imap);
    assert_eq!(last.len(), 3, "the new snapshot is not in LIST: {last:?}");
    for l in &seen {
        for (snap, folders) in l {
            assert_eq!(Some(folders), last.get(snap), "LIST showed {snap} with {folders:?} while it was made");
        }
    }
    for s in fs::read_dir(repo.join("alice")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("20")) {
        assert_verified(&s.path());
    }
    d.assert_clean_log();
}

/// A repository the mail user can reach (traverse, not list), as the README says.
fn reachable_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    fs::create_dir(&repo).unwrap();
    for p in [dir, &repo] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o711)).unwrap();
    }
    repo
}

#[test]
fn d23_snapshots_as_imap_folders() {
    let out = tempdir();
    let repo = reachable_repo(out.path());
    let conf = recipe("2.3", &repo, &out.path().join("snapshots.acl"));
    fs::set_permissions(out.path().join("snapshots.acl"), fs::Permissions::from_mode(0o644)).unwrap();
    let d = Dovecot::start(DovecotOptions { users: ["alice", "bob", "carol"].map(String::from).to_vec(), extra_conf: conf, ..Default::default() });
    snapshots_as_imap_folders(&d, &repo);
}

#[test]
fn d24_snapshots_as_imap_folders() {
    let out = <V24 as Release>::tempdir();
    let repo = reachable_repo(out.path());
    let conf = recipe("2.4", &V24::inside(&repo), Path::new("/nonexistent"));
    let d = Dovecot24::start(DovecotOptions { users: ["alice", "bob", "carol"].map(String::from).to_vec(), extra_conf: conf, ..Default::default() });
    snapshots_as_imap_folders(&d, &repo);
}

/// `doveadm maildir-backup -A -V repo:REPO` (the plugin, as the mail user): every user's view is made
/// by the first run and kept by the next ones (with the setting instead of -V, and with neither), by a
/// root `prune` in between, and by the mail user's runs after it (views of the mail user's own,
/// read-only to Dovecot, which the next run must still be able to change).
#[test]
fn d23_plugin_keeps_every_users_view() {
    use support::plugin::run_plugin;
    let out = support::readback::vmail_tempdir();
    fs::set_permissions(out.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let repo = out.path().join("repo");
    let acl = out.path().join("snapshots.acl");
    let conf = recipe("2.3", &repo, &acl);
    fs::set_permissions(&acl, fs::Permissions::from_mode(0o644)).unwrap();
    let d = Dovecot::start(DovecotOptions { users: vec!["alice".into(), "bob".into()], extra_conf: conf, ..Default::default() });
    for u in ["alice", "bob"] {
        populate(&d, u, FOLDERS, 3);
    }
    let dest = format!("repo:{}", repo.display());
    let counts = |d: &Dovecot| -> Vec<usize> { ["alice", "bob"].iter().map(|u| listed(&mut d.imap(u)).len()).collect() };
    let quiet = |r: support::Run| {
        r.expect_ok();
        assert!(!r.stderr.contains("Error"), "{}", r.show());
    };
    quiet(run_plugin(&d, &["maildir-backup", "-A", "-V", &dest]));
    assert_eq!(counts(&d), [1, 1]);
    std::thread::sleep(Duration::from_millis(1100));
    quiet(run_plugin(&d, &["-o", "plugin/maildir_backup_imap_view=yes", "maildir-backup", "-A", &dest]));
    std::thread::sleep(Duration::from_millis(1100));
    quiet(run_plugin(&d, &["maildir-backup", "-A", &dest]));
    assert_eq!(counts(&d), [3, 3]);
    cli_ok(&["prune", &repo.display().to_string(), "--keep-last", "1"]);
    assert_eq!(counts(&d), [1, 1]);
    std::thread::sleep(Duration::from_millis(1100));
    quiet(run_plugin(&d, &["maildir-backup", "-A", &dest]));
    assert_eq!(counts(&d), [2, 2]);
    let mut imap = d.imap("alice");
    let newest = listed(&mut imap).keys().last().unwrap().clone();
    imap.select(&format!("Snapshots.{newest}.Sent")).unwrap();
    assert_eq!(imap.uid_fetch_flags("1:*").unwrap(), d.fetch_uid_flags("alice", "Sent", None));
    d.assert_clean_log();
}

/// A view behind a directory the mail user cannot pass through is made, and the run says which
/// directory keeps Dovecot out.
#[test]
fn a_view_dovecot_cannot_reach_is_named() {
    let out = tempdir();
    let md = out.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(md.join(sub)).unwrap();
    }
    fs::write(md.join("cur/1700000000.M1P1.host,S=6:2,S"), "x: y\r\n").unwrap();
    chown_vmail_recursive(&md);
    let repo = out.path().join("repo");
    let r = cli(&["backup", "--repo", &repo.display().to_string(), "--name", "alice", "--imap-view", &md.display().to_string()]);
    r.expect_ok().expect_stderr(&["cannot reach the IMAP view", &format!("{} (mode 0700) does not let it through", repo.display())]);
    assert!(repo.join("alice/imap-view/mail").read_dir().unwrap().count() == 1);
}
