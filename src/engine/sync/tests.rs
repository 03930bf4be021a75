//! `Tree::apply` on Maildirs made by hand: what each kind of change in the source becomes in
//! the staged copy, fed by the real listing functions (`discover`, `watch_and_list`).

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::engine::reconcile::watch_and_list;
use crate::engine::NoProgress;
use crate::maildir::folders;
use crate::maildir::MailLocation;
use crate::test_support::*;

/// A source Maildir and an empty staging dir, both in one temp dir.
struct World {
    _t: tempfile::TempDir,
    src: PathBuf,
    staging: PathBuf,
    pool: rayon::ThreadPool,
}

impl World {
    fn new(folders: &[&str]) -> World {
        let t = tmp();
        let src = t.path().join("Maildir");
        make_maildir(&src, folders);
        let staging = t.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        World { _t: t, src, staging, pool }
    }

    fn tree(&self) -> Tree {
        Tree::new(Dir::open(&self.staging).unwrap(), false)
    }

    /// One full pass: every folder listed, gone ones as None, applied.
    fn pass(&self, tree: &mut Tree) -> PassStats {
        let md = open(&self.src);
        let known: Vec<Folder> = tree.folders.values().map(|s| s.folder.clone()).collect();
        let listings = list_all(&md, &known);
        tree.apply(&md, listings, &self.pool, None, &NoProgress).unwrap()
    }

    fn staged(&self) -> Vec<String> {
        message_files(&self.staging).iter().map(|p| p.strip_prefix(&self.staging).unwrap().to_string_lossy().into_owned()).collect()
    }
}

/// The tree's entries as staged paths, sorted: must equal the message files in staging.
/// (Wherever the entries are: see `Tree::spill_folders`.)
fn tracked(tree: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, s) in &tree.folders {
        out.extend(tree.sorted_entries(s).map(|e| e.unwrap()).map(|e| staged_path(rel, e.sub, &e.name).to_string_lossy().into_owned()));
    }
    out.sort();
    out
}

fn no_changes() -> PassStats {
    PassStats::default()
}

#[test]
fn new_messages_are_copied_with_size_and_checksum() {
    let w = World::new(&[".Archive"]);
    put(&w.src, "cur", "1.M1P1.h,S=10:2,S", &body("1"));
    put(&w.src, "new", "2.M2P2.h", &body("2"));
    put(&w.src.join(".Archive"), "cur", "3.M3P3.h:2,", &body("3"));
    let mut tree = w.tree();
    let s = w.pass(&mut tree);
    let bytes: u64 = ["1", "2", "3"].iter().map(|u| body(u).len() as u64).sum();
    assert_eq!(s, PassStats { copied: 3, bytes, ..no_changes() });
    assert_eq!(w.staged(), vec![".Archive/cur/3.M3P3.h:2,", "cur/1.M1P1.h,S=10:2,S", "new/2.M2P2.h"]);
    assert_eq!(tracked(&tree), w.staged());
    assert_eq!(fs::read(w.staging.join("new/2.M2P2.h")).unwrap(), body("2"));
    let e = &tree.folders[Path::new("")].entries["1.M1P1.h,S=10"];
    assert_eq!((e.sub, &*e.name, e.size), (Subdir::Cur, "1.M1P1.h,S=10:2,S", body("1").len() as u64));
    assert_eq!(hex(e.blake3), blake3_hex(&body("1")));
    // Folder dirs are made in the staged copy, tmp/ included.
    assert!(w.staging.join(".Archive/tmp").is_dir());
    // Nothing changed: nothing done.
    assert_eq!(w.pass(&mut tree), no_changes());
}

#[test]
fn a_flag_change_is_a_rename_in_the_copy_not_a_new_copy() {
    let w = World::new(&[]);
    put(&w.src, "cur", "1.M1P1.h:2,", &body("1"));
    let mut tree = w.tree();
    w.pass(&mut tree);
    let staged_ino = ino(&w.staging.join("cur/1.M1P1.h:2,"));
    fs::rename(w.src.join("cur/1.M1P1.h:2,"), w.src.join("cur/1.M1P1.h:2,FS")).unwrap();
    let s = w.pass(&mut tree);
    assert_eq!(s, PassStats { renamed: 1, ..no_changes() });
    assert_eq!(w.staged(), vec!["cur/1.M1P1.h:2,FS"]);
    // The very same staged file, renamed: never read again.
    assert_eq!(ino(&w.staging.join("cur/1.M1P1.h:2,FS")), staged_ino);
    assert_eq!(tree.folders[Path::new("")].entries["1.M1P1.h"].name.as_ref(), "1.M1P1.h:2,FS");
    assert_eq!(tracked(&tree), w.staged());
}

#[test]
fn new_to_cur_is_a_rename_in_the_copy() {
    let w = World::new(&[]);
    put(&w.src, "new", "1.M1P1.h", &body("1"));
    let mut tree = w.tree();
    w.pass(&mut tree);
    let staged_ino = ino(&w.staging.join("new/1.M1P1.h"));
    fs::rename(w.src.join("new/1.M1P1.h"), w.src.join("cur/1.M1P1.h:2,S")).unwrap();
    assert_eq!(w.pass(&mut tree), PassStats { renamed: 1, ..no_changes() });
    assert_eq!(w.staged(), vec!["cur/1.M1P1.h:2,S"]);
    assert_eq!(ino(&w.staging.join("cur/1.M1P1.h:2,S")), staged_ino);
    assert_eq!(tree.folders[Path::new("")].entries["1.M1P1.h"].sub, Subdir::Cur);
}

#[test]
fn a_removed_message_is_removed_from_the_copy() {
    let w = World::new(&[]);
    put(&w.src, "cur", "1.M1P1.h:2,", &body("1"));
    put(&w.src, "cur", "2.M2P2.h:2,", &body("2"));
    let mut tree = w.tree();
    w.pass(&mut tree);
    fs::remove_file(w.src.join("cur/1.M1P1.h:2,")).unwrap();
    assert_eq!(w.pass(&mut tree), PassStats { removed: 1, ..no_changes() });
    assert_eq!(w.staged(), vec!["cur/2.M2P2.h:2,"]);
    assert_eq!(tracked(&tree), w.staged());
}

#[test]
fn a_message_moved_between_folders_is_moved_in_the_copy() {
    let w = World::new(&[".Archive"]);
    put(&w.src, "cur", "1.M1P1.h:2,S", &body("1"));
    let mut tree = w.tree();
    w.pass(&mut tree);
    let staged_ino = ino(&w.staging.join("cur/1.M1P1.h:2,S"));
    // Dovecot's MOVE keeps the unique name.
    fs::rename(w.src.join("cur/1.M1P1.h:2,S"), w.src.join(".Archive/cur/1.M1P1.h:2,S")).unwrap();
    assert_eq!(w.pass(&mut tree), PassStats { moved: 1, ..no_changes() });
    assert_eq!(w.staged(), vec![".Archive/cur/1.M1P1.h:2,S"]);
    assert_eq!(ino(&w.staging.join(".Archive/cur/1.M1P1.h:2,S")), staged_ino);
    assert_eq!(tracked(&tree), w.staged());
}

#[test]
fn a_renamed_folder_is_moved_and_the_old_one_dropped() {
    let w = World::new(&[".Old"]);
    let old = w.src.join(".Old");
    put(&old, "cur", "1.M1P1.h:2,", &body("1"));
    put(&old, "new", "2.M2P2.h", &body("2"));
    let mut tree = w.tree();
    w.pass(&mut tree);
    fs::rename(&old, w.src.join(".New")).unwrap();
    assert_eq!(w.pass(&mut tree), PassStats { moved: 2, ..no_changes() });
    assert_eq!(w.staged(), vec![".New/cur/1.M1P1.h:2,", ".New/new/2.M2P2.h"]);
    assert!(!w.staging.join(".Old").exists(), "the gone folder's staged dir is removed");
    assert!(!tree.folders.contains_key(Path::new(".Old")));
    assert_eq!(tracked(&tree), w.staged());
}

#[test]
fn a_name_that_vanishes_between_listing_and_copy_counts_as_vanished() {
    let w = World::new(&[".Archive"]);
    put(&w.src, "cur", "1.M1P1.h:2,", &body("1"));
    put(&w.src, "cur", "2.M2P2.h:2,", &body("2"));
    put(&w.src.join(".Archive"), "new", "3.M3P3.h", &body("3"));
    let md = open(&w.src);
    let listings = list_all(&md, &[]);
    // After the listing, before the copy: one expunged, one renamed (flags), and a folder's
    // new/ removed altogether.
    fs::remove_file(w.src.join("cur/1.M1P1.h:2,")).unwrap();
    fs::rename(w.src.join("cur/2.M2P2.h:2,"), w.src.join("cur/2.M2P2.h:2,S")).unwrap();
    fs::remove_file(w.src.join(".Archive/new/3.M3P3.h")).unwrap();
    fs::remove_dir(w.src.join(".Archive/new")).unwrap();
    let mut tree = w.tree();
    let s = tree.apply(&md, listings, &w.pool, None, &NoProgress).unwrap();
    assert_eq!(s, PassStats { vanished: 3, ..no_changes() });
    assert!(w.staged().is_empty());
    assert!(tracked(&tree).is_empty(), "nothing recorded for what was not copied");
    // The next pass finds the renamed one.
    fs::create_dir(w.src.join(".Archive/new")).unwrap();
    let s = w.pass(&mut tree);
    assert_eq!((s.copied, s.vanished), (1, 0));
    assert_eq!(w.staged(), vec!["cur/2.M2P2.h:2,S"]);
}

#[test]
fn hard_linked_copies_are_staged_once() {
    // Dovecot's COPY hard-links the file into the other folder under the same unique name.
    let w = World::new(&[".Archive", ".Other"]);
    let a = put(&w.src, "cur", "x.M1P1.h,S=9:2,", &body("x"));
    fs::hard_link(&a, w.src.join(".Archive/cur/x.M1P1.h,S=9:2,S")).unwrap();
    fs::hard_link(&a, w.src.join(".Other/new/x.M1P1.h,S=9")).unwrap();
    let mut tree = w.tree();
    let s = w.pass(&mut tree);
    assert_eq!((s.copied, s.linked, s.bytes), (1, 2, body("x").len() as u64));
    let staged = w.staged();
    assert_eq!(staged.len(), 3);
    let inos: std::collections::HashSet<u64> = staged.iter().map(|p| ino(&w.staging.join(p))).collect();
    assert_eq!(inos.len(), 1, "one copy, linked under every name: {staged:?}");
    for e in tree.folders.values().flat_map(|s| s.entries.values()) {
        assert_eq!(hex(e.blake3), blake3_hex(&body("x")));
    }
}

/// Root-free equivalent of the Dovecot-driven `a_message_leaving_two_folders_in_one_pass_leaves_no_stale_copy`:
/// one unique name hard-linked into two folders (COPY), then gone from both before the next pass.
#[test]
fn a_message_leaving_two_folders_in_one_pass_leaves_no_stale_copy() {
    let w = World::new(&[".Archive"]);
    let x = "1700000002.M2P2.host,S=40";
    for u in ["1700000001.M1P1.host", "1700000003.M3P3.host"] {
        put(&w.src, "cur", &format!("{u}:2,"), &body(u));
        put(&w.src.join(".Archive"), "cur", &format!("{u}.a:2,"), &body(u));
    }
    let inbox_x = put(&w.src, "cur", &format!("{x}:2,S"), &body(x));
    let archive_x = w.src.join(".Archive/cur").join(format!("{x}:2,S"));
    fs::hard_link(&inbox_x, &archive_x).unwrap();
    let mut tree = w.tree();
    w.pass(&mut tree);
    assert_eq!(w.staged().iter().filter(|p| p.contains(x)).count(), 2);

    // Before the next pass: expunged from INBOX, moved from Archive to INBOX, expunged there.
    fs::remove_file(&inbox_x).unwrap();
    let moved = w.src.join("cur").join(format!("{x}:2,S"));
    fs::rename(&archive_x, &moved).unwrap();
    fs::remove_file(&moved).unwrap();
    let s = w.pass(&mut tree);
    assert_eq!(s, PassStats { removed: 2, ..no_changes() });

    let left: Vec<String> = w.staged().into_iter().filter(|p| p.contains(x)).collect();
    assert!(left.is_empty(), "a message gone from both folders is still staged (and no longer tracked): {left:?}");
    assert_eq!(tracked(&tree), w.staged(), "staged message files vs the tree's entries");
    assert_eq!(w.staged().len(), 4);
}

/// The same unique name in two folders, both gone, and it turns up in a third: one staged copy
/// is moved there, the other removed; none is left behind untracked.
#[test]
fn a_message_leaving_two_folders_for_a_third_is_moved_once() {
    let w = World::new(&[".A", ".B", ".C"]);
    let x = "x.M1P1.h";
    let in_a = put(&w.src.join(".A"), "cur", &format!("{x}:2,"), &body(x));
    let in_b = w.src.join(".B/cur").join(format!("{x}:2,"));
    fs::hard_link(&in_a, &in_b).unwrap();
    let mut tree = w.tree();
    w.pass(&mut tree);
    fs::rename(&in_a, w.src.join(".C/cur").join(format!("{x}:2,F"))).unwrap();
    fs::remove_file(&in_b).unwrap();
    let s = w.pass(&mut tree);
    assert_eq!(s, PassStats { moved: 1, removed: 1, ..no_changes() });
    assert_eq!(w.staged(), vec![format!(".C/cur/{x}:2,F")]);
    assert_eq!(tracked(&tree), w.staged());
}

/// A hard-linked message staged in an earlier pass: a new name for the same inode in another
/// folder is linked to the earlier copy, not read again.
#[test]
fn a_later_link_to_a_staged_file_is_linked_not_copied() {
    let w = World::new(&[".Archive"]);
    let a = put(&w.src, "cur", "x.M1P1.h:2,", &body("x"));
    fs::hard_link(&a, w.src.join("cur/y.M2P2.h:2,")).unwrap();
    let mut tree = w.tree();
    assert_eq!(w.pass(&mut tree).copied, 1);
    fs::hard_link(&a, w.src.join(".Archive/cur/x.M1P1.h:2,S")).unwrap();
    let s = w.pass(&mut tree);
    assert_eq!((s.copied, s.linked, s.bytes), (0, 1, 0));
    assert_eq!(ino(&w.staging.join(".Archive/cur/x.M1P1.h:2,S")), ino(&w.staging.join("cur/x.M1P1.h:2,")));
}

/// A folder's entries written to the scratch file come back as they were: a pass over the
/// folders that changed does what it does without that, even with a new name linked to a
/// copy in a folder still on disk; a change in that folder brings its entries back.
#[test]
fn entries_on_disk_between_passes_come_back_as_they_were() {
    let w = World::new(&[".Archive", ".Trash"]);
    let x = put(&w.src, "cur", "x.M1P1.h:2,", &body("x"));
    fs::hard_link(&x, w.src.join("cur/y.M2P2.h:2,")).unwrap();
    put(&w.src, "cur", "1.M1P1.h:2,", &body("1"));
    put(&w.src.join(".Archive"), "cur", "3.M3P3.h:2,S", &body("3"));
    put(&w.src.join(".Archive"), "cur", "4.M4P4.h:2,S", &body("4"));
    let mut tree = w.tree();
    w.pass(&mut tree);
    if Dir::open(&w.staging).unwrap().scratch_file().unwrap().is_none() {
        eprintln!("no O_TMPFILE on this file system: entries stay in memory");
        return;
    }
    let all: Vec<PathBuf> = tree.folders.keys().cloned().collect();
    tree.spill_folders(&all).unwrap();
    assert!(tree.folders.values().all(|s| s.entries.is_empty()));
    assert!(tree.folders[Path::new("")].spilled.is_some() && tree.folders[Path::new(".Archive")].spilled.is_some());
    assert_eq!(tracked(&tree), w.staged());

    // A flag change and a move between the folders on disk but the inbox, and a COPY out of it.
    let archive = w.src.join(".Archive/cur");
    fs::rename(archive.join("3.M3P3.h:2,S"), archive.join("3.M3P3.h:2,ST")).unwrap();
    fs::rename(archive.join("4.M4P4.h:2,S"), w.src.join(".Trash/cur/4.M4P4.h:2,S")).unwrap();
    fs::hard_link(&x, w.src.join(".Trash/cur/x.M1P1.h:2,S")).unwrap();
    let md = open(&w.src);
    let listings = tree.folders.values().filter(|s| !s.folder.is_inbox()).map(|s| (s.folder.clone(), watch_and_list(&md, &s.folder, None).unwrap())).collect();
    let s = tree.apply(&md, listings, &w.pool, None, &NoProgress).unwrap();
    assert_eq!(s, PassStats { renamed: 1, moved: 1, linked: 1, ..no_changes() });
    assert!(tree.folders[Path::new("")].spilled.is_some(), "a folder no pass listed stays on disk");
    assert_eq!(ino(&w.staging.join(".Trash/cur/x.M1P1.h:2,S")), ino(&w.staging.join("cur/x.M1P1.h:2,")));
    assert_eq!(tracked(&tree), w.staged());
    assert_eq!(tree.folders[Path::new(".Trash")].bytes(), (body("4").len() + body("x").len()) as u64);

    fs::remove_file(w.src.join("cur/1.M1P1.h:2,")).unwrap();
    assert_eq!(w.pass(&mut tree), PassStats { removed: 1, ..no_changes() });
    assert!(tree.folders.values().all(|s| s.spilled.is_none()));
    assert_eq!(tracked(&tree), w.staged());
    assert_eq!(w.staged().len(), 5);
}

/// Every job is in exactly one run; no run holds more than `RUN_JOBS` jobs or
/// `FOLDERS_PER_BATCH` folders.
#[test]
fn jobs_run_in_bounded_runs() {
    let job = |i: usize| CopyJob { own_key: None, listed: Listed { sub: Subdir::Cur, name: format!("{i}.M1P1.h") } };
    let sizes = [5, 2 * RUN_JOBS + 7, 0, 3].into_iter().chain(std::iter::repeat_n(1, 100));
    let jobs: Vec<(PathBuf, Vec<CopyJob>)> = sizes.enumerate().map(|(f, n)| (PathBuf::from(format!(".F{f}")), (0..n).map(job).collect())).collect();
    let mut seen: Vec<Vec<bool>> = jobs.iter().map(|(_, js)| vec![false; js.len()]).collect();
    for run in runs(&jobs) {
        assert!(run.len() <= FOLDERS_PER_BATCH);
        assert!(run.iter().map(|(_, r)| r.len()).sum::<usize>() <= RUN_JOBS);
        for (f, range) in run {
            for i in range {
                assert!(!std::mem::replace(&mut seen[f][i], true), "job {i} of folder {f} run twice");
            }
        }
    }
    assert!(seen.iter().flatten().all(|&s| s), "every job runs");
}

#[test]
fn planted_entries_are_skipped_with_a_warning() {
    let w = World::new(&[]);
    put(&w.src, "cur", "ok.M1P1.h:2,", &body("ok"));
    std::os::unix::fs::symlink("/etc/passwd", w.src.join("cur/evil.M2P2.h:2,")).unwrap();
    nix::unistd::mkfifo(&w.src.join("cur/fifo.M3P3.h:2,"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut tree = w.tree();
    let s = w.pass(&mut tree);
    assert_eq!(s.copied, 1);
    assert_eq!(w.staged(), vec!["cur/ok.M1P1.h:2,"]);
    let warnings = tree.warnings().join("\n");
    assert!(warnings.contains("evil.M2P2.h") && warnings.contains("fifo.M3P3.h"), "{warnings}");
    // Given once, however many passes meet them.
    w.pass(&mut tree);
    assert_eq!(tree.warnings().len(), 2, "{:?}", tree.warnings());
}

#[test]
fn layout_fs_folders_nest() {
    let t = tmp();
    let src = t.path().join("Maildir");
    make_maildir(&src, &["Archive", "Archive/2024"]);
    put(&src.join("Archive/2024"), "cur", "1.M1P1.h:2,", &body("1"));
    let loc = MailLocation { layout: crate::maildir::Layout::Fs, ..MailLocation::plain(&src) };
    let md = open_at(&loc);
    let (found, _) = folders::discover(&md).unwrap();
    assert_eq!(found.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["INBOX", "Archive", "Archive/2024"]);
    let staging = t.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let mut tree = Tree::new(Dir::open(&staging).unwrap(), false);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    tree.apply(&md, list_all(&md, &[]), &pool, None, &NoProgress).unwrap();
    assert!(staging.join("Archive/2024/cur/1.M1P1.h:2,").is_file());
    // The child folder goes: the parent (a folder itself) stays.
    fs::remove_dir_all(src.join("Archive/2024")).unwrap();
    let known: Vec<Folder> = tree.folders.values().map(|s| s.folder.clone()).collect();
    let s = tree.apply(&md, list_all(&md, &known), &pool, None, &NoProgress).unwrap();
    assert_eq!(s.removed, 1);
    assert!(!staging.join("Archive/2024").exists() && staging.join("Archive/cur").is_dir());
}

/// A message first seen while the locks are held is staged empty and filled after; a later
/// pass may rename it, move it to another folder or remove it meanwhile.
#[test]
fn messages_found_under_the_locks_are_copied_after_them() {
    let w = World::new(&[".Archive"]);
    let big = |tag: &str| tag.as_bytes().iter().copied().cycle().take(300_000).collect::<Vec<u8>>();
    put(&w.src, "cur", "0.M0P0.h:2,", &body("0"));
    let mut tree = w.tree();
    w.pass(&mut tree);

    tree.defer_copies(true);
    put(&w.src, "new", "1.M1P1.h", &big("one"));
    put(&w.src, "new", "2.M2P2.h", &big("two"));
    put(&w.src, "new", "3.M3P3.h", &big("three"));
    put(&w.src, "cur", "4.M4P4.h:2,", &body("4"));
    let s = w.pass(&mut tree);
    assert_eq!((s.copied, s.bytes), (4, 0), "nothing is read under the locks");
    assert_eq!(fs::metadata(w.staging.join("new/1.M1P1.h")).unwrap().len(), 0, "staged empty");
    assert_eq!(fs::metadata(w.staging.join("cur/4.M4P4.h:2,")).unwrap().len(), 0, "staged empty");

    // Still under the locks: one is read (renamed), one moved to Archive, one expunged.
    fs::rename(w.src.join("new/1.M1P1.h"), w.src.join("cur/1.M1P1.h:2,S")).unwrap();
    fs::rename(w.src.join("new/2.M2P2.h"), w.src.join(".Archive/cur/2.M2P2.h:2,")).unwrap();
    fs::remove_file(w.src.join("new/3.M3P3.h")).unwrap();
    let s = w.pass(&mut tree);
    assert_eq!((s.renamed, s.moved, s.removed), (1, 1, 1));
    tree.defer_copies(false);

    let s = tree.copy_deferred(&w.pool, &NoProgress).unwrap();
    assert_eq!(s.bytes, 3 * 300_000 + body("4").len() as u64, "all four were read after the locks");
    assert_eq!(fs::read(w.staging.join("cur/1.M1P1.h:2,S")).unwrap(), big("one"));
    assert_eq!(fs::read(w.staging.join(".Archive/cur/2.M2P2.h:2,")).unwrap(), big("two"));
    assert_eq!(fs::read(w.staging.join("cur/4.M4P4.h:2,")).unwrap(), body("4"));
    assert_eq!(tracked(&tree), w.staged());
    let e1 = &tree.folders[Path::new("")].entries["1.M1P1.h"];
    let e2 = &tree.folders[Path::new(".Archive")].entries["2.M2P2.h"];
    assert_eq!((e1.size, hex(e1.blake3)), (300_000, blake3_hex(&big("one"))));
    assert_eq!(hex(e2.blake3), blake3_hex(&big("two")), "the moved one's checksum is recorded where it went");
    // Nothing deferred outside the locks.
    put(&w.src, "new", "5.M5P5.h", &big("five"));
    let s = w.pass(&mut tree);
    assert_eq!(s.bytes, 300_000);
    assert_eq!(tree.copy_deferred(&w.pool, &NoProgress).unwrap(), PassStats::default());
}

/// A previous snapshot whose records are read only when asked to read ahead; it links nothing.
#[derive(Default)]
struct Unread {
    read_aheads: std::sync::atomic::AtomicUsize,
    lookups: std::sync::atomic::AtomicUsize,
}

impl Reuse for Unread {
    fn link_into(&self, _: &str, _: u64, _: &Dir, _: &str) -> Option<String> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        None
    }
    fn read_ahead(&self) {
        self.read_aheads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn ready(&self) -> bool {
        self.read_aheads.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
    fn stored_uniques(&self, _: &str) -> Result<HashSet<String>, BackupError> {
        Ok(HashSet::new())
    }
}

/// Under the locks, a new message is not looked up in a previous snapshot whose records are not
/// read yet (users would wait for that read): it is copied after them. Outside the locks, the
/// records are read ahead once, then each new message is looked up.
#[test]
fn the_previous_snapshot_is_not_read_under_the_locks() {
    let w = World::new(&[]);
    let mut tree = w.tree();
    w.pass(&mut tree);
    let (md, previous) = (open(&w.src), Unread::default());
    let pass = |tree: &mut Tree| {
        let listings = list_all(&md, &tree.folders.values().map(|s| s.folder.clone()).collect::<Vec<_>>());
        tree.apply(&md, listings, &w.pool, Some(&previous), &NoProgress).unwrap()
    };
    let count = |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::Relaxed);

    tree.defer_copies(true);
    put(&w.src, "new", "1.M1P1.h", &body("1"));
    assert_eq!(pass(&mut tree).copied, 1);
    assert_eq!((count(&previous.read_aheads), count(&previous.lookups)), (0, 0));
    tree.defer_copies(false);
    tree.copy_deferred(&w.pool, &NoProgress).unwrap();

    put(&w.src, "new", "2.M2P2.h", &body("2"));
    put(&w.src, "new", "3.M3P3.h", &body("3"));
    assert_eq!(pass(&mut tree).copied, 2);
    assert_eq!((count(&previous.read_aheads), count(&previous.lookups)), (1, 2));

    // Read by now: under the locks again, looked up.
    tree.defer_copies(true);
    put(&w.src, "new", "4.M4P4.h", &body("4"));
    pass(&mut tree);
    assert_eq!(count(&previous.lookups), 3);
    tree.defer_copies(false);
    tree.copy_deferred(&w.pool, &NoProgress).unwrap();
    assert_eq!(tracked(&tree), w.staged());
}

/// Past `MAX_DEFERRED`, messages are copied at once (each deferral holds descriptors).
#[test]
fn deferred_copies_are_bounded() {
    let w = World::new(&[]);
    let mut tree = w.tree();
    w.pass(&mut tree);
    tree.defer_copies(true);
    let n = MAX_DEFERRED + 5;
    let msg = vec![b'x'; 1000];
    for i in 0..n {
        put(&w.src, "new", &format!("{i}.M{i}P1.h"), &msg);
    }
    let s = w.pass(&mut tree);
    assert_eq!((s.copied, s.bytes), (n as u64, 5 * 1000));
    let s = tree.copy_deferred(&w.pool, &NoProgress).unwrap();
    assert_eq!(s.bytes, MAX_DEFERRED as u64 * 1000);
    assert!(tree.folders[Path::new("")].entries.values().all(|e| hex(e.blake3) == blake3_hex(&msg)));
}

/// A listing with exactly these (key, sub, name) entries, full.
fn listing_of(entries: &[(&str, Subdir, &str)]) -> Listing {
    let mut l = Listing::default();
    for (k, sub, name) in entries {
        l.entries.insert(k.to_string(), Listed { sub: *sub, name: name.to_string() });
    }
    l
}

/// A readdir racing Dovecot's flag rename reports a message under its old and new names (the
/// second under a `\0dup:` key); when only the new one is left, the copy keeps exactly one
/// file for it, whichever key the listings gave which name.
#[test]
fn a_message_seen_under_two_names_ends_as_one_staged_file() {
    let w = World::new(&[]);
    let (u, old, new) = ("1.M1P1.h", "1.M1P1.h:2,S", "1.M1P1.h:2,RS");
    let dup = |n: &str| format!("\0dup:{n}");
    let md = open(&w.src);
    let inbox = folders::discover(&md).unwrap().0.remove(0);
    let apply = |tree: &mut Tree, l: Listing| tree.apply(&md, vec![(inbox.clone(), Some(l))], &w.pool, None, &NoProgress).unwrap();

    // Both names exist for a moment, and both are listed.
    put(&w.src, "cur", old, &body("1"));
    let mut tree = w.tree();
    apply(&mut tree, listing_of(&[(u, Subdir::Cur, old)]));
    put(&w.src, "cur", new, &body("1"));
    apply(&mut tree, listing_of(&[(u, Subdir::Cur, old), (&dup(new), Subdir::Cur, new)]));
    assert_eq!(tracked(&tree), w.staged());
    // The rename completes: only the new name is left, listed under the message's own key.
    fs::remove_file(w.src.join("cur").join(old)).unwrap();
    apply(&mut tree, listing_of(&[(u, Subdir::Cur, new)]));
    assert_eq!(w.staged(), vec![format!("cur/{new}")], "the message's one file is kept");
    assert_eq!(tracked(&tree), w.staged());

    // The same with the keys the other way round between two listings (a full listing goes
    // by readdir order, a partial one by name).
    let w = World::new(&[]);
    let md = open(&w.src);
    let apply = |tree: &mut Tree, l: Listing| tree.apply(&md, vec![(inbox.clone(), Some(l))], &w.pool, None, &NoProgress).unwrap();
    put(&w.src, "cur", old, &body("1"));
    put(&w.src, "cur", new, &body("1"));
    let mut tree = w.tree();
    apply(&mut tree, listing_of(&[(u, Subdir::Cur, new), (&dup(old), Subdir::Cur, old)]));
    apply(&mut tree, listing_of(&[(u, Subdir::Cur, old), (&dup(new), Subdir::Cur, new)]));
    assert_eq!(tracked(&tree), w.staged());
    fs::remove_file(w.src.join("cur").join(old)).unwrap();
    apply(&mut tree, listing_of(&[(u, Subdir::Cur, new)]));
    assert_eq!(w.staged(), vec![format!("cur/{new}")]);
    assert_eq!(tracked(&tree), w.staged());
    assert_eq!(fs::read(w.staging.join("cur").join(new)).unwrap(), body("1"));
}
