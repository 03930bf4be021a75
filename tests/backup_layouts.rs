//! `backup` of the Maildir shapes Dovecot makes (control/index split, fs layout, metadata, symlinks).
//!
//! `maildir-backup backup` of the Maildir shapes Dovecot 2.3 really makes, read back by Dovecot itself.
//!
//! - CONTROL=/INDEX= split out of the Maildir: the backup is self-contained (dovecot-uidlist and
//!   dovecot-keywords inside each folder dir, subscriptions in the root) and `maildir:DEST` shows the same
//!   mailboxes, subscriptions, UIDs and flags as the source.
//! - LAYOUT=fs with nested folders (`Archive/2024`, a non-selectable parent `Lists/`), also combined with
//!   CONTROL=/INDEX=: read back as `maildir:DEST:LAYOUT=fs`.
//! - An empty folder, names with spaces and non-ASCII (modified UTF-7 on disk), keywords ($Work, $Later).
//! - `--with-indexes` copies the dovecot.index* files (and only then).
//! - Message files keep mode, owner, mtime (= Dovecot's INTERNALDATE); folder dirs keep mode, owner, times.
//! - Symlinks (a message symlink in cur/ pointing outside, a symlinked folder dir) are never followed: not in
//!   the backup, and a warning naming them on stderr.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use support::churn;
use support::*;

const USER: &str = "alice";

fn backup(source: &str, dest: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["backup", "--json"];
    args.extend_from_slice(extra);
    args.push(source);
    args.push(dest.to_str().unwrap());
    let r = cli(&args);
    assert_eq!(r.code(), Some(0), "backup {source} {}: {}", dest.display(), r.show());
    r
}

fn assert_verify_whole(dest: &Path) {
    let r = cli(&["verify", dest.to_str().unwrap()]);
    assert_eq!(r.code(), Some(0), "verify {}: {}", dest.display(), r.show());
    assert!(r.stdout.contains("whole"), "{}", r.show());
}

/// `doveadm mailbox list` (optionally `-s` subscribed only), sorted.
fn mailbox_list(d: &Dovecot, loc: Option<&str>, subscribed: bool) -> BTreeSet<String> {
    let ov = loc.map(|l| format!("mail_location={l}"));
    let mut args: Vec<&str> = Vec::new();
    if let Some(o) = &ov {
        args.extend_from_slice(&["-o", o]);
    }
    args.extend_from_slice(&["mailbox", "list", "-u", USER]);
    if subscribed {
        args.push("-s");
    }
    d.doveadm_ok(&args).lines().map(str::to_string).collect()
}

/// `doveadm fetch 'uid flags date.received'` of one mailbox, rows sorted.
fn fetch_dates(d: &Dovecot, mailbox: &str, loc: Option<&str>) -> Vec<String> {
    let ov = loc.map(|l| format!("mail_location={l}"));
    let mut args: Vec<&str> = Vec::new();
    if let Some(o) = &ov {
        args.extend_from_slice(&["-o", o]);
    }
    args.extend_from_slice(&["-f", "tab", "fetch", "-u", USER, "uid date.received", "mailbox", mailbox]);
    let mut v: Vec<String> = d.doveadm_ok(&args).lines().skip(1).map(str::to_string).collect();
    v.sort();
    v
}

/// The source's (uid, flags) of every mailbox, read before the backup.
fn source_flags(d: &Dovecot, mailboxes: &[&str]) -> Vec<(String, Vec<(u32, String)>)> {
    mailboxes.iter().map(|m| (m.to_string(), d.fetch_uid_flags(USER, m, None))).collect()
}

/// Dovecot, reading the backup through `loc`, lists the same mailboxes, subscriptions and per-mailbox UIDs and
/// flags as the source did.
/// A backup made by root stays root's (see the README's Security section): an admin who wants Dovecot to
/// read one in place hands it to the mail user first, as these tests do.
fn hand_to_vmail(backup: &Path) {
    chown_vmail_recursive(backup);
}

fn assert_dovecot_reads_same(d: &Dovecot, loc: &str, src: &[(String, Vec<(u32, String)>)], src_list: &BTreeSet<String>, src_subs: &BTreeSet<String>) {
    for (m, want) in src {
        let got = d.fetch_uid_flags(USER, m, Some(loc));
        assert_eq!(&got, want, "mailbox {m:?}: backup ({loc}) vs source");
    }
    assert_eq!(&mailbox_list(d, Some(loc), false), src_list, "mailbox list of the backup ({loc})");
    assert_eq!(&mailbox_list(d, Some(loc), true), src_subs, "subscriptions of the backup ({loc})");
}

/// Folders with messages, flags and keywords, an empty folder, spaces and non-ASCII in names, nesting
/// (`sep` is the hierarchy separator), subscriptions. Returns the mailbox names.
fn fill(d: &Dovecot) -> Vec<String> {
    let sep = d.separator();
    let names: Vec<String> = vec![
        "INBOX".into(),
        "Archive".into(),
        format!("Archive{sep}2024"),
        "My Folder".into(),
        "Entwürfe".into(),
        format!("Lists{sep}rust"),
        "Empty".into(),
    ];
    let with_mail: Vec<&str> = names.iter().filter(|n| *n != "Empty").map(String::as_str).collect();
    let mut imap = d.imap(USER);
    for n in &names {
        if n != "INBOX" {
            imap.create(n).unwrap_or_else(|e| panic!("CREATE {n}: {e}"));
        }
    }
    imap.logout();
    populate(d, USER, &with_mail, 23);
    // More flag shapes: \Deleted (T), \Draft (D), a second keyword.
    let mut imap = d.imap(USER);
    imap.select("Archive").unwrap();
    imap.uid_store("3", "+FLAGS", "\\Deleted \\Draft").unwrap();
    imap.uid_store("4", "+FLAGS", "$Later").unwrap();
    imap.noop().unwrap();
    for n in ["Archive", "Entwürfe", "Empty"] {
        imap.command(&format!("SUBSCRIBE {}", imap_quote(n))).unwrap();
    }
    imap.select("Empty").unwrap();
    imap.logout();
    names
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

/// Every directory below `root` that has a cur/ (a folder), relative to root.
fn folder_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.join("cur").is_dir() {
            out.push(dir.strip_prefix(root).unwrap().to_path_buf());
        }
        for e in fs::read_dir(dir).unwrap().flatten() {
            let n = e.file_name();
            if e.file_type().unwrap().is_dir() && !["cur", "new", "tmp"].contains(&n.to_str().unwrap_or("")) {
                walk(root, &e.path(), out);
            }
        }
    }
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Checks that each folder dir of the backup carries its own control files, taken from `control_dir(rel)`.
fn assert_self_contained(backup: &Path, control_dir: impl Fn(&Path) -> PathBuf) {
    let folders = folder_dirs(backup);
    assert!(folders.len() >= 6, "folders in backup: {folders:?}");
    for rel in &folders {
        let ctl = control_dir(rel);
        for f in ["dovecot-uidlist", "dovecot-keywords"] {
            let src = ctl.join(f);
            let dst = backup.join(rel).join(f);
            if src.exists() {
                assert_eq!(fs::read(&dst).ok(), Some(fs::read(&src).unwrap()), "{} vs {}", dst.display(), src.display());
            } else {
                assert!(!dst.exists(), "{} exists, source {} does not", dst.display(), src.display());
            }
        }
        let has_uidlist = backup.join(rel).join("dovecot-uidlist").is_file();
        let empty = churn::scan_message_ids(&backup.join(rel).join("cur")).is_empty() && churn::scan_message_ids(&backup.join(rel).join("new")).is_empty();
        assert!(has_uidlist || empty, "{}: messages but no dovecot-uidlist", rel.display());
    }
}

/// Files named dovecot.index* / dovecot.list.index* anywhere below `root`.
fn index_files(root: &Path) -> Vec<PathBuf> {
    churn::all_files(root)
        .into_iter()
        .filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy();
            n.starts_with("dovecot.index") || n.starts_with("dovecot.list.index")
        })
        .collect()
}

#[test]
fn control_and_index_dirs_split_out() {
    let d = Dovecot::start(DovecotOptions { control: true, ..Default::default() });
    let names = fill(&d);
    let mailboxes: Vec<&str> = names.iter().map(String::as_str).collect();
    let src = source_flags(&d, &mailboxes);
    let (src_list, src_subs) = (mailbox_list(&d, None, false), mailbox_list(&d, None, true));
    assert!(src_subs.contains("Entwürfe") && src_list.contains("Empty"), "{src_list:?} {src_subs:?}");
    assert!(d.maildir(USER).join(".Entw&APw-rfe").is_dir() && d.maildir(USER).join(".My Folder").is_dir());
    assert!(!d.maildir(USER).join("dovecot-uidlist").exists(), "uidlist should live in CONTROL=");

    // With CONTROL= nothing of ours (the lock files) is created in the mail dirs, so their times stay put:
    // give some of them old, distinctive times that the backup must carry.
    let mut dir_times = Vec::new();
    for (k, rel) in ["", "cur", ".Archive", ".Archive/new", ".Empty"].iter().enumerate() {
        let t = nix::sys::time::TimeSpec::new(1_300_000_000 + k as i64 * 1000, 5_000_000 * (k as i64 + 1));
        let p = d.maildir(USER).join(rel);
        nix::sys::stat::utimensat(None, &p, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
        dir_times.push((rel.to_string(), (t.tv_sec(), t.tv_nsec())));
    }

    let out = tempdir();
    let dest = out.path().join("backup");
    let r = backup(&d.mail_location(USER), &dest, &[]);
    assert_eq!(r.json()["messages"].as_u64(), Some(6 * 23), "{}", r.show());
    assert_eq!(r.json()["folders"].as_u64(), Some(names.len() as u64), "{}", r.show());
    let times_in_backup: Vec<(String, (i64, i64))> = dir_times
        .iter()
        .map(|(rel, _)| {
            let md = fs::metadata(dest.join(rel)).unwrap();
            (rel.clone(), (md.mtime(), md.mtime_nsec()))
        })
        .collect();
    assert_verify_whole(&dest);
    let ctl_root = d.control_root(USER);
    assert_self_contained(&dest, |rel| if rel.as_os_str().is_empty() { ctl_root.join(".INBOX") } else { ctl_root.join(rel) });
    assert_eq!(fs::read(dest.join("subscriptions")).ok(), fs::read(ctl_root.join("subscriptions")).ok(), "subscriptions");
    assert!(index_files(&dest).is_empty(), "index files without --with-indexes: {:?}", index_files(&dest));
    assert!(churn::files_under_tmp(&dest).is_empty());

    // Dovecot reads the backup on its own: no CONTROL=, no INDEX=.
    hand_to_vmail(&dest);
    assert_dovecot_reads_same(&d, &format!("maildir:{}", dest.display()), &src, &src_list, &src_subs);
    assert!(src.iter().any(|(_, v)| v.iter().any(|(_, f)| f.contains("$Work"))), "keywords expected in the source");
    // Last, so it cannot hide the checks above: folder dirs, and the Maildir root too, keep their mtimes.
    assert_eq!(times_in_backup, dir_times, "mtimes of directories in the backup vs the source");
}

#[test]
fn layout_fs_nested() {
    for control in [false, true] {
        let d = Dovecot::start(DovecotOptions { layout_fs: true, control, ..Default::default() });
        let names = fill(&d);
        let mailboxes: Vec<&str> = names.iter().map(String::as_str).collect();
        let root = d.maildir(USER);
        assert!(root.join("Archive/2024/cur").is_dir() && root.join("Entw&APw-rfe/cur").is_dir());
        assert!(root.join("Lists/rust/cur").is_dir() && !root.join("Lists/cur").exists(), "Lists/ should be a bare parent");
        let src = source_flags(&d, &mailboxes);
        let (src_list, src_subs) = (mailbox_list(&d, None, false), mailbox_list(&d, None, true));
        assert!(src_list.contains("Lists") && src_list.contains("Archive/2024"), "{src_list:?}");

        let out = tempdir();
        let dest = out.path().join("backup");
        let r = backup(&d.mail_location(USER), &dest, &[]);
        assert_eq!(r.json()["messages"].as_u64(), Some(6 * 23), "{}", r.show());
        assert_eq!(r.json()["folders"].as_u64(), Some(names.len() as u64), "{}", r.show());
        assert_verify_whole(&dest);
        assert!(dest.join("Archive/2024/dovecot-uidlist").is_file() && dest.join("Lists/rust/dovecot-uidlist").is_file());
        assert!(!dest.join("Lists/cur").exists() && dest.join("Lists").is_dir());
        let parent_md = fs::metadata(dest.join("Lists")).unwrap();
        let src_parent_md = fs::metadata(root.join("Lists")).unwrap();
        assert_eq!((parent_md.mode(), parent_md.uid(), parent_md.mtime()), (src_parent_md.mode(), 0, src_parent_md.mtime()), "bare parent dir metadata (root's)");
        if control {
            let ctl_root = d.control_root(USER);
            assert_self_contained(&dest, |rel| if rel.as_os_str().is_empty() { ctl_root.join("INBOX") } else { ctl_root.join(rel) });
        } else {
            assert_self_contained(&dest, |rel| root.join(rel));
        }
        hand_to_vmail(&dest);
        assert_dovecot_reads_same(&d, &format!("maildir:{}:LAYOUT=fs", dest.display()), &src, &src_list, &src_subs);
    }
}

#[test]
fn keywords_indexes_and_file_metadata() {
    let d = Dovecot::start(DovecotOptions::default());
    let names = fill(&d);
    let mailboxes: Vec<&str> = names.iter().map(String::as_str).collect();
    let root = d.maildir(USER);
    // Make some files differ in mode and times, so preserving them is visible.
    let inbox_cur = root.join("cur");
    let some: Vec<PathBuf> = churn::all_files(&inbox_cur).into_iter().take(3).collect();
    fs::set_permissions(&some[0], std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let old = nix::sys::time::TimeSpec::new(1_234_567_890, 123_456_789);
    nix::sys::stat::utimensat(None, &some[1], &old, &old, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
    let src = source_flags(&d, &mailboxes);
    let src_dates: Vec<Vec<String>> = mailboxes.iter().map(|m| fetch_dates(&d, m, None)).collect();
    let (src_list, src_subs) = (mailbox_list(&d, None, false), mailbox_list(&d, None, true));
    let src_index = index_files(&root);
    assert!(src_index.iter().any(|f| f.ends_with("dovecot.index.log")), "{src_index:?}");

    let out = tempdir();
    let plain = out.path().join("plain");
    let with = out.path().join("with-indexes");
    // `plain` last: taking the uidlist locks touches the source's folder dirs (the lock files come and go),
    // so only the latest backup can match their mtimes.
    backup(&d.mail_location(USER), &with, &["--with-indexes"]);
    backup(&d.mail_location(USER), &plain, &[]);
    assert_verify_whole(&plain);
    assert_verify_whole(&with);

    // Indexes: none without the option, every one (same bytes: nothing changed meanwhile) with it.
    assert!(index_files(&plain).is_empty(), "{:?}", index_files(&plain));
    for f in &src_index {
        let rel = f.strip_prefix(&root).unwrap();
        assert_eq!(fs::read(with.join(rel)).ok(), Some(fs::read(f).unwrap()), "--with-indexes: {}", rel.display());
    }

    // Keywords: the files letters need dovecot-keywords to mean anything.
    let kw = churn::read_keywords(&plain.join(".Archive"));
    assert!(kw.values().any(|k| k == "$Work") && kw.values().any(|k| k == "$Later"), "{kw:?}");
    assert_eq!(fs::read(plain.join(".Archive/dovecot-keywords")).unwrap(), fs::read(root.join(".Archive/dovecot-keywords")).unwrap());

    // Metadata of every message file and folder dir.
    let (vuid, vgid) = ensure_vmail();
    let mut files = 0;
    for f in churn::all_files(&root) {
        let rel = f.strip_prefix(&root).unwrap();
        let parent = rel.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str());
        if !matches!(parent, Some("cur") | Some("new")) {
            continue;
        }
        files += 1;
        let (s, b) = (fs::symlink_metadata(&f).unwrap(), fs::symlink_metadata(plain.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display())));
        assert_eq!(
            (s.mode(), s.uid(), s.gid(), s.mtime(), s.mtime_nsec(), s.len()),
            (b.mode(), b.uid(), b.gid(), b.mtime(), b.mtime_nsec(), b.len()),
            "{}",
            rel.display()
        );
        assert_eq!((b.uid(), b.gid()), (vuid, vgid), "{}", rel.display());
    }
    assert_eq!(files, 6 * 23);
    let b = fs::metadata(plain.join(some[0].strip_prefix(&root).unwrap())).unwrap();
    assert_eq!(b.mode() & 0o777, 0o640);
    let b = fs::metadata(plain.join(some[1].strip_prefix(&root).unwrap())).unwrap();
    assert_eq!((b.mtime(), b.mtime_nsec()), (1_234_567_890, 123_456_789));
    for rel in folder_dirs(&root) {
        for sub in ["", "cur", "new", "tmp"] {
            let p = rel.join(sub);
            let (s, b) = (fs::metadata(root.join(&p)).unwrap(), fs::metadata(plain.join(&p)).unwrap());
            // Directories keep their modes but stay root's: the mail user can neither enter nor change a
            // backup root made (the message files inside keep their owner, for the restore).
            assert_eq!((s.mode(), 0, 0), (b.mode(), b.uid(), b.gid()), "dir {}", p.display());
            // The root's own mtime is not comparable here: INBOX's uidlist lock file comes and goes in the
            // source root during the backup (see control_and_index_dirs_split_out for the root's times).
            if !p.as_os_str().is_empty() {
                assert_eq!((s.mtime(), s.mtime_nsec()), (b.mtime(), b.mtime_nsec()), "mtime of dir {}", p.display());
            }
        }
    }

    // Dovecot: same UIDs, flags (keywords included) and INTERNALDATEs (the mtimes) as the source.
    let loc = format!("maildir:{}", plain.display());
    hand_to_vmail(&plain);
    hand_to_vmail(&with);
    assert_dovecot_reads_same(&d, &loc, &src, &src_list, &src_subs);
    for (m, want) in mailboxes.iter().zip(&src_dates) {
        assert_eq!(&fetch_dates(&d, m, Some(&loc)), want, "date.received of {m}");
    }
    // The copy with indexes is usable by Dovecot with its indexes too.
    assert_dovecot_reads_same(&d, &format!("maildir:{}", with.display()), &src, &src_list, &src_subs);
}

#[test]
fn symlinks_are_never_followed() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, USER, &["INBOX", "Work"], 10);
    let root = d.maildir(USER);
    let outside = tempdir();
    // A "message" outside the Maildir, linked into INBOX/cur under a message-like name.
    let secret = outside.path().join("secret");
    fs::write(&secret, b"From: x@example.com\r\nMessage-ID: <secret@outside.example>\r\n\r\nsecret\r\n").unwrap();
    let msg_link = root.join("cur/1700000001.M1P1.evil,S=60:2,S");
    symlink(&secret, &msg_link).unwrap();
    let new_link = root.join("new/1700000002.M2P2.evil");
    symlink(&secret, &new_link).unwrap();
    // A whole folder outside, linked in as .Evil.
    let evil = outside.path().join("evilfolder");
    for s in ["cur", "new", "tmp"] {
        fs::create_dir_all(evil.join(s)).unwrap();
    }
    fs::write(evil.join("cur/1700000003.M3P3.evil,S=60:2,S"), b"From: x@example.com\r\nMessage-ID: <secret2@outside.example>\r\n\r\nsecret\r\n").unwrap();
    let folder_link = root.join(".Evil");
    symlink(&evil, &folder_link).unwrap();
    // And a symlinked folder for a name Dovecot knows: .Work2 -> .Work (inside, but still a symlink).
    let inner_link = root.join(".Work2");
    symlink(root.join(".Work"), &inner_link).unwrap();

    let out = tempdir();
    let dest = out.path().join("backup");
    let r = backup(&d.mail_location(USER), &dest, &[]);
    for l in [&msg_link, &new_link, &folder_link, &inner_link] {
        assert!(r.stderr.contains(&l.display().to_string()), "no warning naming {}: {}", l.display(), r.show());
    }
    assert!(r.stderr.contains("symlink"), "{}", r.show());
    assert_eq!(r.json()["messages"].as_u64(), Some(20), "{}", r.show());
    assert_verify_whole(&dest);
    let links: Vec<PathBuf> = churn::all_files(&dest).into_iter().filter(|f| fs::symlink_metadata(f).unwrap().file_type().is_symlink()).collect();
    assert!(links.is_empty(), "symlinks in the backup: {links:?}");
    let names = dir_names(&dest);
    assert!(!names.contains(".Evil") && !names.contains(".Work2"), "{names:?}");
    let ids = churn::scan_message_ids(&dest);
    assert!(!ids.contains_key("<secret@outside.example>") && !ids.contains_key("<secret2@outside.example>"), "outside content copied");
    assert_eq!(ids.len(), 20);
    // The outside files are untouched.
    assert!(secret.is_file() && evil.join("cur/1700000003.M3P3.evil,S=60:2,S").is_file());
}

/// Dovecot keeps an expunged message's line in dovecot-uidlist until it rewrites the file: such a backup is
/// still whole, and Dovecot reading it shows the same messages as the source.
#[test]
fn expunged_messages_still_in_the_uidlist() {
    let d = Dovecot::start(DovecotOptions::default());
    populate(&d, USER, &["INBOX"], 20);
    let mut imap = d.imap(USER);
    imap.select("INBOX").unwrap();
    imap.uid_expunge("3:5").unwrap();
    imap.uid_expunge("11").unwrap();
    imap.logout();
    let root = d.maildir(USER);
    let uidlist = fs::read_to_string(root.join("dovecot-uidlist")).unwrap();
    let src = d.fetch_uid_flags(USER, "INBOX", None);
    assert_eq!(src.len(), 16);

    let out = tempdir();
    let dest = out.path().join("backup");
    backup(&d.mail_location(USER), &dest, &[]);
    assert_verify_whole(&dest);
    assert_eq!(fs::read_to_string(dest.join("dovecot-uidlist")).unwrap(), uidlist);
    hand_to_vmail(&dest);
    assert_eq!(d.fetch_uid_flags(USER, "INBOX", Some(&format!("maildir:{}:INDEX=MEMORY", dest.display()))), src);
    eprintln!("uidlist lines in the source for 20 appended, 4 expunged: {}", uidlist.lines().count() - 1);
}
