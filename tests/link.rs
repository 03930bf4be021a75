//! `backup --link`: snapshots whose message files are hard links to the live Maildir's own, taken with
//! the same reconcile and locks as a copy, on a real Dovecot 2.3.
//!
//! - `link_backups_under_imap_churn_are_exact`: five link backups while IMAP sessions change flags, move,
//!   append and expunge: each verifies, holds every message of its reconcile instant exactly once (by
//!   Message-ID), and Dovecot reads it with the UIDs and flags its uidlist and names say. Then, quiet, one
//!   with `--checksum`: every message is the source's own inode, control files are copies, checksums are
//!   recorded and a size-preserving change is caught.
//! - `link_refuses_another_mount_and_writes_nothing`: a tmpfs and a bind mount of the same disk (hard links
//!   cross neither) are refused with exit 64 before anything is written.
//! - `link_snapshots_make_a_repository`: `--link --repo` twice, restore from a link snapshot, prune.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::churn::{backups_under_churn, imap_churn, presence_problems, ChurnBackup, Churn, Tracker};
use support::procs::mb;
use support::readback::{assert_no_problems, assert_verified, check_dovecot_reads_backup, read_manifest};
use support::repo_helpers::{flip_bytes, inode, message_files, start_with_users, take_snapshot};
use support::*;

const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive", "Archive.2024"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `backup --json --link EXTRA... SOURCE DEST`.
fn link_backup(source: &Path, dest: &Path, extra: &[&str]) -> Run {
    let mut c = mb();
    c.args(["backup", "--json", "--link"]).args(extra).arg(source).arg(dest);
    Run::of(c)
}

/// Message files by path relative to `root`: (dev, inode).
fn inodes(root: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    message_files(root).into_iter().map(|f| (f.strip_prefix(root).unwrap().to_path_buf(), inode(&f))).collect()
}

#[test]
fn link_backups_under_imap_churn_are_exact() {
    let d = start_with_users(&["alice"]);
    populate(&d, "alice", FOLDERS, 100);
    let maildir = d.maildir("alice");
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&maildir), 400);
    // Beside the Maildir, on its file system.
    let out = tempdir();

    let churn = Churn::start(imap_churn(&d, FOLDERS, 3), tracker.clone());
    churn.wait_ops(30, Duration::from_secs(20));
    let (runs, _) = backups_under_churn(churn, &tracker, out.path(), "l", 5, (20, Duration::from_secs(20)), |dest| link_backup(&maildir, dest, &[]));
    for ChurnBackup { dest, start, end, run } in &runs {
        let report = run.json();
        // Linked in some pass: at least what the backup holds (more if some went again meanwhile).
        assert!(report["messages_linked"].as_u64() >= report["messages"].as_u64(), "{}", run.stdout);
        assert_eq!(report["bytes_copied"].as_u64(), Some(0), "{}", run.stdout);
        assert_verified(dest);
        assert!(read_manifest(dest).messages.iter().all(|m| m.blake3.is_empty()), "{}: checksums without --checksum", dest.display());
        assert_no_problems(&format!("{}: presence", dest.display()), &presence_problems(&tracker, dest, *start, *end));
        // Root's backup directories are root's; Dovecot reads as vmail (the messages are its already).
        chown_vmail_recursive(dest);
        assert_no_problems("Dovecot reading the link backup", &check_dovecot_reads_backup(&d, "alice", dest, false));
    }

    // Quiet: every message is the source's own file; the control files are copies.
    let dest = out.path().join("quiet");
    link_backup(&maildir, &dest, &["--checksum"]).expect_ok();
    let (src, copy) = (inodes(&maildir), inodes(&dest));
    assert_eq!(src.len(), copy.len());
    assert_eq!(copy, src, "the link backup's messages are not the source's files");
    assert_ne!(inode(&maildir.join("dovecot-uidlist")), inode(&dest.join("dovecot-uidlist")));
    let manifest = read_manifest(&dest);
    assert!(manifest.messages.iter().all(|m| m.blake3.len() == 64), "--checksum recorded no checksums");
    assert_verified(&dest);
    // A change that keeps the size is caught by the checksum (in the source too: it is one file).
    let victim = message_files(&dest).into_iter().next().unwrap();
    flip_bytes(&victim);
    let r = cli(&["verify", s(&dest)]);
    assert_eq!(r.code(), Some(1), "{}", r.show());
    assert!(r.stdout.contains("checksum differs"), "{}", r.show());
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Mount {
        fs::create_dir_all(at).unwrap();
        let mut c = Command::new("mount");
        c.args(args).arg(at);
        Run::of(c).expect_ok();
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn link_refuses_another_mount_and_writes_nothing() {
    let d = start_with_users(&["alice"]);
    populate(&d, "alice", &["INBOX"], 5);
    let out = tempdir();
    let tmpfs = Mount::new(&["-t", "tmpfs", "-o", "size=16m", "tmpfs"], &out.path().join("tmpfs"));
    fs::create_dir(out.path().join("disk")).unwrap();
    let bind_src = out.path().join("disk").display().to_string();
    let bind = Mount::new(&["--bind", &bind_src], &out.path().join("bind"));
    for m in [&tmpfs, &bind] {
        let dest = m.0.join("alice");
        let r = link_backup(&d.maildir("alice"), &dest, &[]);
        r.expect_code(EX_USAGE).expect_stderr(&["--link", "is not on the file system (mount) of the source", s(&d.maildir("alice"))]);
        assert_eq!(fs::read_dir(&m.0).unwrap().count(), 0, "{}: something was written", m.0.display());
    }
    // The same backup, copying, is fine there; --checksum alone is a usage error.
    let mut c = mb();
    c.args(["backup", "-q"]).arg(d.maildir("alice")).arg(tmpfs.0.join("copy"));
    Run::of(c).expect_ok();
    let r = cli(&["backup", "--checksum", s(&d.maildir("alice")), s(&out.path().join("x"))]);
    r.expect_code(EX_USAGE);
}

#[test]
fn link_snapshots_make_a_repository() {
    let d = start_with_users(&["alice", "bob"]);
    populate(&d, "alice", &["INBOX", "Sent"], 10);
    let maildir = d.maildir("alice");
    let out = tempdir();
    let repo = out.path().join("repo");
    let (first, _) = take_snapshot(s(&maildir), &repo, "alice", &["--link"]);
    let at_first: Vec<_> = ["INBOX", "Sent"].iter().map(|f| d.fetch_uid_flags("alice", f, None)).collect();
    let mut imap = d.imap("alice");
    imap.select("INBOX").unwrap();
    imap.uid_expunge("1:2").unwrap();
    imap.logout();
    std::thread::sleep(Duration::from_millis(1100));
    let (second, report) = take_snapshot(s(&maildir), &repo, "alice", &["--link"]);
    assert_eq!(report["messages"].as_u64(), Some(18), "{report}");
    assert_eq!(report["messages_linked"].as_u64(), Some(18), "linked from the source, not the previous snapshot: {report}");
    assert_eq!(inodes(&second), inodes(&maildir));
    assert_eq!(inodes(&first).len(), 20, "the first snapshot keeps the expunged messages");
    let check = cli(&["check", s(&repo), "--deep"]);
    assert_eq!(check.code(), Some(0), "{}", check.show());

    // Restore from the first (link) snapshot into bob's empty Maildir: copies, with UIDs and flags.
    let bob = d.maildir("bob");
    cli_ok(&["restore", s(&first), s(&bob)]);
    chown_vmail_recursive(&bob);
    for (folder, want) in ["INBOX", "Sent"].iter().zip(&at_first) {
        assert_eq!(&d.fetch_uid_flags("bob", folder, None), want, "{folder}: restored vs alice's at the first snapshot");
    }
    let bob_inodes: Vec<_> = inodes(&bob).into_values().collect();
    assert!(inodes(&first).values().all(|i| !bob_inodes.contains(i)), "the restore linked instead of copying");

    // Prune drops the first snapshot: the live mail is untouched.
    let before = inodes(&maildir);
    cli_ok(&["prune", s(&repo), "--keep-last", "1"]);
    assert!(!first.exists() && second.exists());
    assert_eq!(inodes(&maildir), before);
    assert_verified(&second);
}
