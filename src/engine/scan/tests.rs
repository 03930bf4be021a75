//! Listing on hand-made folders: full listings, partial (inotify) listings, and cur/ or new/
//! replaced by something that is not a directory.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::engine::reconcile::watch_and_list;
use crate::engine::sync::Tree;
use crate::engine::NoProgress;
use crate::test_support::*;

fn subs_of(folder: &Path) -> [Option<Dir>; 2] {
    let mut w = Vec::new();
    let subs = open_subdirs(&Dir::open(folder).unwrap(), &mut w).unwrap();
    assert!(w.is_empty(), "{w:?}");
    subs
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

fn listed(sub: Subdir, name: &str) -> Listed {
    Listed { sub, name: name.to_string() }
}

#[test]
fn list_folder_keys_messages_by_unique_name() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    put(f, "cur", "1.M1P1.h,S=5:2,S", b"one");
    put(f, "new", "2.M2P2.h", b"two");
    put(f, "cur", ".hidden", b"not a message");
    let l = list_folder(&subs_of(f)).unwrap();
    assert_eq!(l.entries.len(), 2);
    assert_eq!(l.entries["1.M1P1.h,S=5"], listed(Subdir::Cur, "1.M1P1.h,S=5:2,S"));
    assert_eq!(l.entries["2.M2P2.h"], listed(Subdir::New, "2.M2P2.h"));
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert!(l.stamps.iter().all(Option::is_some) && l.listed_at.is_some() && l.touched.is_none());
}

#[test]
fn list_folder_keeps_a_second_file_with_the_same_unique_name() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    put(f, "cur", "1.M1P1.h:2,S", b"a");
    put(f, "new", "1.M1P1.h", b"b");
    let l = list_folder(&subs_of(f)).unwrap();
    assert_eq!(l.entries.len(), 2, "nothing dropped: {:?}", l.entries);
    assert_eq!(l.entries["1.M1P1.h"], listed(Subdir::Cur, "1.M1P1.h:2,S"));
    assert_eq!(l.entries["\0dup:1.M1P1.h"], listed(Subdir::New, "1.M1P1.h"));
}

#[test]
fn list_folder_warns_about_what_is_not_a_regular_file_with_a_usable_name() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    put(f, "cur", "ok.M1P1.h:2,", b"ok");
    fs::create_dir(f.join("cur/dir.M2P2.h:2,")).unwrap();
    symlink("/etc/passwd", f.join("cur/link.M3P3.h:2,")).unwrap();
    mkfifo(&f.join("new/fifo.M4P4.h"));
    put(f, "new", "evil\nline.M5P5.h", b"x");
    fs::write(f.join("new").join(OsStr::from_bytes(b"latin1-\xe9.M6P6.h")), b"x").unwrap();
    let l = list_folder(&subs_of(f)).unwrap();
    assert_eq!(l.entries.keys().collect::<Vec<_>>(), ["ok.M1P1.h"]);
    let w = l.warnings.join("\n");
    for (needle, why) in [
        ("dir.M2P2.h", "a directory"),
        ("link.M3P3.h", "symlink"),
        ("fifo.M4P4.h", "not a regular file"),
        ("control characters", "newline"),
        ("not UTF-8", "latin-1"),
    ] {
        assert!(w.contains(needle), "no warning for the {why}: {w}");
    }
    // The newline never reaches a warning as it is.
    assert!(!w.contains("evil\nline"), "{w}");
}

#[test]
fn list_folder_bounds_the_warnings_of_one_directory() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    for i in 0..50 {
        symlink("/nonexistent", f.join(format!("cur/l{i}.M1P1.h"))).unwrap();
    }
    let l = list_folder(&subs_of(f)).unwrap();
    assert!(l.entries.is_empty());
    assert_eq!(l.warnings.len(), 21, "{:?}", l.warnings);
    assert!(l.warnings.last().unwrap().contains("skipped 30 more entries"), "{:?}", l.warnings.last());
}

#[test]
fn open_subdirs_never_follows_a_symlinked_cur() {
    let t = tmp();
    let f = t.path().join("f");
    make_folder(&f);
    let elsewhere = t.path().join("elsewhere");
    make_folder(&elsewhere);
    put(&elsewhere, "cur", "secret.M1P1.h:2,", b"secret");
    fs::remove_dir(f.join("cur")).unwrap();
    symlink(elsewhere.join("cur"), f.join("cur")).unwrap();
    put(&f, "new", "mine.M2P2.h", b"mine");
    let mut w = Vec::new();
    let subs = open_subdirs(&Dir::open(&f).unwrap(), &mut w).unwrap();
    assert!(subs[0].is_none() && subs[1].is_some());
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("symlink") && w[0].contains("cur"), "{w:?}");
    let l = list_folder(&subs).unwrap();
    assert_eq!(l.entries.keys().collect::<Vec<_>>(), ["mine.M2P2.h"]);
    assert!(l.stamps[0].is_none());
}

#[test]
fn open_subdirs_with_a_missing_new_is_not_an_error() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    fs::remove_dir(f.join("new")).unwrap();
    let mut w = Vec::new();
    let subs = open_subdirs(&Dir::open(f).unwrap(), &mut w).unwrap();
    assert!(subs[0].is_some() && subs[1].is_none() && w.is_empty());
}

/// A FIFO or a regular file in place of new/ (or cur/) is something a hostile owner planted,
/// like a symlink there: skipped with a warning, never an error that fails the backup.
#[test]
fn open_subdirs_warns_about_a_fifo_or_file_in_place_of_new_or_cur() {
    for (sub, kind) in [("new", "fifo"), ("new", "file"), ("cur", "fifo"), ("cur", "file")] {
        let t = tmp();
        let f = t.path();
        make_folder(f);
        fs::remove_dir(f.join(sub)).unwrap();
        match kind {
            "fifo" => mkfifo(&f.join(sub)),
            _ => fs::write(f.join(sub), b"planted").unwrap(),
        }
        let mut w = Vec::new();
        let subs = open_subdirs(&Dir::open(f).unwrap(), &mut w);
        let subs = subs.unwrap_or_else(|e| panic!("{kind} in place of {sub}/: an error, not a warning: {e}"));
        let i = if sub == "cur" { 0 } else { 1 };
        assert!(subs[i].is_none() && subs[1 - i].is_some(), "{kind} in place of {sub}/");
        assert!(w.len() == 1 && w[0].contains(sub), "{kind} in place of {sub}/: {w:?}");
    }
}

#[test]
fn watch_and_list_of_a_folder_with_a_symlinked_new_warns_and_lists_the_rest() {
    let t = tmp();
    let root = t.path().join("Maildir");
    make_maildir(&root, &[".Work"]);
    put(&root.join(".Work"), "cur", "1.M1P1.h:2,", b"1");
    fs::remove_dir(root.join(".Work/new")).unwrap();
    symlink(t.path(), root.join(".Work/new")).unwrap();
    let md = open(&root);
    let f = crate::maildir::Folder::at(&md.loc, ".Work".into());
    let l = watch_and_list(&md, &f, None).unwrap().unwrap();
    assert_eq!(l.entries.keys().collect::<Vec<_>>(), ["1.M1P1.h"]);
    assert!(l.warnings.iter().any(|w| w.contains("symlink")), "{:?}", l.warnings);
    // A folder gone (or replaced by a symlink) lists as None.
    fs::rename(root.join(".Work"), t.path().join("away")).unwrap();
    assert!(watch_and_list(&md, &f, None).unwrap().is_none());
    symlink(t.path().join("away"), root.join(".Work")).unwrap();
    assert!(watch_and_list(&md, &f, None).unwrap().is_none());
}

fn changes(list: &[(Subdir, &str)]) -> super::super::watch::Changes {
    list.iter().map(|(s, n)| (*s, n.to_string())).collect()
}

#[test]
fn partial_listing_looks_only_at_the_names_reported() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    // A rename (flags) reported with both names, a new message, a removed one; an untouched
    // message that is not reported stays out of the listing and out of scope.
    put(f, "cur", "a.M1P1.h:2,S", b"a");
    put(f, "new", "b.M2P2.h", b"b");
    put(f, "cur", "untouched.M4P4.h:2,", b"u");
    let subs = subs_of(f);
    let ch = changes(&[(Subdir::Cur, "a.M1P1.h:2,"), (Subdir::Cur, "a.M1P1.h:2,S"), (Subdir::New, "b.M2P2.h"), (Subdir::Cur, "gone.M3P3.h:2,")]);
    let l = partial_listing(&subs, &ch, |_| None);
    assert_eq!(l.entries.len(), 2);
    assert_eq!(l.entries["a.M1P1.h"], listed(Subdir::Cur, "a.M1P1.h:2,S"));
    assert_eq!(l.entries["b.M2P2.h"], listed(Subdir::New, "b.M2P2.h"));
    let touched = l.touched.as_ref().unwrap();
    for k in ["a.M1P1.h", "b.M2P2.h", "gone.M3P3.h"] {
        assert!(touched.contains(k), "{k} not in scope: {touched:?}");
    }
    assert!(!touched.contains("untouched.M4P4.h"));
    assert!(l.warnings.is_empty());
}

#[test]
fn partial_listing_also_looks_where_a_message_was_staged() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    // Only the new name was reported (the old one's event was lost or merged): the staged
    // location is looked at too, and the message found where it is now.
    put(f, "cur", "a.M1P1.h:2,S", b"a");
    let subs = subs_of(f);
    let current = |k: &str| (k == "a.M1P1.h").then(|| listed(Subdir::New, "a.M1P1.h"));
    let l = partial_listing(&subs, &changes(&[(Subdir::Cur, "a.M1P1.h:2,S")]), current);
    assert_eq!(l.entries.len(), 1);
    assert_eq!(l.entries["a.M1P1.h"], listed(Subdir::Cur, "a.M1P1.h:2,S"));
    // Still where it was staged, and the event for another name of it: both found, neither dropped.
    put(f, "new", "a.M1P1.h", b"a");
    let l = partial_listing(&subs, &changes(&[(Subdir::Cur, "a.M1P1.h:2,S")]), current);
    assert_eq!(l.entries.len(), 2, "{:?}", l.entries);
}

#[test]
fn partial_listing_skips_unsafe_names_planted_files_and_missing_dirs() {
    let t = tmp();
    let f = t.path();
    make_folder(f);
    symlink("/etc/passwd", f.join("cur/link.M1P1.h:2,")).unwrap();
    put(f, "cur", "bad\nname.M2P2.h:2,", b"x");
    let mut subs = subs_of(f);
    subs[1] = None; // new/ missing
    put(f, "new", "n.M3P3.h", b"x");
    let ch = changes(&[
        (Subdir::Cur, "link.M1P1.h:2,"),
        (Subdir::Cur, "bad\nname.M2P2.h:2,"),
        (Subdir::Cur, ".dotted"),
        (Subdir::New, "n.M3P3.h"),
    ]);
    let l = partial_listing(&subs, &ch, |_| None);
    assert!(l.entries.is_empty(), "{:?}", l.entries);
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(l.warnings[0].contains("link.M1P1.h") && l.warnings[0].contains("symlink"), "{:?}", l.warnings);
    let touched = l.touched.unwrap();
    assert!(!touched.iter().any(|k| k.contains("bad\nname")), "an unsafe name is never in scope: {touched:?}");
}

/// A partial listing applied to the staged copy changes only what it touched.
#[test]
fn a_partial_listing_leaves_untouched_messages_alone() {
    let t = tmp();
    let root = t.path().join("Maildir");
    make_maildir(&root, &[]);
    put(&root, "cur", "a.M1P1.h:2,", b"a");
    put(&root, "cur", "b.M2P2.h:2,", b"b");
    let staging = t.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let md = open(&root);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut tree = Tree::new(Dir::open(&staging).unwrap(), false);
    tree.apply(&md, list_all(&md, &[]), &pool, None, &NoProgress).unwrap();
    let inbox = tree.folders[Path::new("")].folder.clone();
    fs::remove_file(root.join("cur/a.M1P1.h:2,")).unwrap();
    fs::rename(root.join("cur/b.M2P2.h:2,"), root.join("cur/b.M2P2.h:2,S")).unwrap();
    put(&root, "new", "c.M3P3.h", b"c");
    // inotify reported only a's removal and c's arrival (b's rename is for a later pass).
    let subs = subs_of(&root);
    let state = &tree.folders[Path::new("")];
    let l = partial_listing(&subs, &changes(&[(Subdir::Cur, "a.M1P1.h:2,"), (Subdir::New, "c.M3P3.h")]), |k| {
        state.entries.get(k).map(|e| Listed { sub: e.sub, name: e.name.to_string() })
    });
    let s = tree.apply(&md, vec![(inbox, Some(l))], &pool, None, &NoProgress).unwrap();
    assert_eq!((s.removed, s.copied, s.renamed), (1, 1, 0));
    let names: HashSet<String> = tree.folders[Path::new("")].entries.values().map(|e| e.name.to_string()).collect();
    assert_eq!(names, HashSet::from(["b.M2P2.h:2,".to_string(), "c.M3P3.h".to_string()]));
}

/// The same through a whole backup: the folder's other messages and the other folders are
/// backed up, with a warning naming the planted entry.
#[test]
fn a_backup_survives_a_fifo_in_place_of_new() {
    let t = tmp();
    let root = t.path().join("Maildir");
    make_maildir(&root, &[".Work"]);
    put(&root, "cur", "1.M1P1.h:2,", b"1");
    put(&root.join(".Work"), "cur", "2.M2P2.h:2,", b"2");
    fs::remove_dir(root.join(".Work/new")).unwrap();
    mkfifo(&root.join(".Work/new"));
    let dest = t.path().join("backup");
    let opts = crate::engine::BackupOptions { jobs: 1, ..Default::default() };
    let r = backup(&crate::maildir::MailLocation::plain(&root), &dest, &opts)
        .unwrap_or_else(|e| panic!("a FIFO in place of .Work/new fails the whole backup: {e}"));
    assert_eq!(r.messages, 2);
    assert!(r.warnings.iter().any(|w| w.contains(".Work/new")), "{:?}", r.warnings);
    assert!(dest.join(".Work/cur/2.M2P2.h:2,").is_file());
}
