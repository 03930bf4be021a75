//! `lock_round` with simulated locks (it is generic over what a lock is), and the
//! dot-lock rounds on a hand-made Maildir.

use std::cell::RefCell;
use std::fs;
use std::rc::Rc;

use super::*;
use crate::maildir::folders;
use crate::test_support::*;

/// A simulated lock: logs its release.
struct Fake {
    i: usize,
    log: Rc<RefCell<Vec<String>>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.log.borrow_mut().push(format!("release {}", self.i));
    }
}

fn log() -> Rc<RefCell<Vec<String>>> {
    Rc::new(RefCell::new(Vec::new()))
}

#[test]
fn all_locks_taken_in_order_in_one_round() {
    let log = log();
    let mut waits = Vec::new();
    let (locks, _since) = lock_round(3, FIRST_LOCK_WAIT, |i, wait| {
        waits.push(wait);
        log.borrow_mut().push(format!("take {i}"));
        Ok(Ok(Fake { i, log: log.clone() }))
    })
    .unwrap()
    .unwrap();
    assert_eq!(locks.iter().map(|l| l.i).collect::<Vec<_>>(), [0, 1, 2]);
    // The first lock, holding none, may wait a little longer; the others only a moment.
    assert_eq!(waits, [FIRST_LOCK_WAIT, NEXT_LOCK_WAIT, NEXT_LOCK_WAIT]);
    assert_eq!(*log.borrow(), ["take 0", "take 1", "take 2"], "nothing released while held");
    drop(locks);
    assert_eq!(log.borrow().len(), 6);
}

#[test]
fn one_busy_lock_lets_go_of_all_taken_and_is_named() {
    let log = log();
    let r = lock_round(3, BUSY_LOCK_WAIT, |i, _| {
        if i == 2 {
            log.borrow_mut().push(format!("busy {i}"));
            return Ok(Err(format!("lock {i} held by pid 1")));
        }
        log.borrow_mut().push(format!("take {i}"));
        Ok(Ok(Fake { i, log: log.clone() }))
    })
    .unwrap();
    let Err((2, why)) = r else { panic!("expected lock 2 busy") };
    assert_eq!(why, "lock 2 held by pid 1");
    assert_eq!(*log.borrow(), ["take 0", "take 1", "busy 2", "release 0", "release 1"]);
}

#[test]
fn a_gone_folder_counts_as_locked_and_an_error_stops_at_once() {
    // dotlock_round's locks are Option<DotLock>: None for a folder deleted meanwhile.
    let (locks, _) = lock_round(3, FIRST_LOCK_WAIT, |i, _| Ok(Ok((i != 1).then_some(i)))).unwrap().unwrap();
    assert_eq!(locks, vec![Some(0), None, Some(2)]);

    let log = log();
    let mut calls = 0;
    let r = lock_round(3, FIRST_LOCK_WAIT, |i, _| {
        calls += 1;
        if i == 1 {
            return Err(BackupError::NotMaildir("x".into()));
        }
        Ok(Ok(Fake { i, log: log.clone() }))
    });
    assert!(matches!(r, Err(BackupError::NotMaildir(_))));
    assert_eq!(calls, 2, "nothing tried after a real error");
    assert_eq!(*log.borrow(), ["release 0"]);
}

/// A Maildir with INBOX and two subfolders, opened, and its folders.
fn maildir_with_folders(t: &tempfile::TempDir) -> (std::path::PathBuf, Maildir, Vec<Folder>) {
    let root = t.path().join("Maildir");
    make_maildir(&root, &[".A", ".B"]);
    let md = open(&root);
    let (found, _) = folders::discover(&md).unwrap();
    (root, md, found)
}

fn locks_on_disk(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = ["", ".A", ".B"]
        .iter()
        .filter(|rel| root.join(rel).join("dovecot-uidlist.lock").exists())
        .map(|r| r.to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn dotlock_round_locks_every_folder_and_releases_them() {
    let t = tmp();
    let (root, md, found) = maildir_with_folders(&t);
    let mut warnings = Vec::new();
    let (locks, _) = dotlock_round(&md, &found, &LockSettings::default(), FIRST_LOCK_WAIT, &mut warnings).unwrap().unwrap();
    assert_eq!(locks.locks.len(), 3);
    assert_eq!(locks_on_disk(&root), ["", ".A", ".B"]);
    let content = fs::read_to_string(root.join(".A/dovecot-uidlist.lock")).unwrap();
    assert_eq!(content, dotlock::lock_content());
    let mut w = Vec::new();
    Box::new(locks).release(&mut w);
    assert!(w.is_empty(), "{w:?}");
    assert!(locks_on_disk(&root).is_empty());
}

#[test]
fn dotlock_round_names_a_held_lock_and_holds_nothing_after() {
    let t = tmp();
    let (root, md, found) = maildir_with_folders(&t);
    // .B's lock is held (by us, through another lock: never broken, never stale).
    let held = DotLock::acquire(&root.join(".B/dovecot-uidlist"), &LockSettings::default()).unwrap();
    let started = Instant::now();
    let r = dotlock_round(&md, &found, &LockSettings::default(), FIRST_LOCK_WAIT, &mut Vec::new()).unwrap();
    let Err(busy) = r else { panic!("expected .B busy") };
    assert!(started.elapsed() < Duration::from_secs(1), "only moments are waited for: {:?}", started.elapsed());
    assert_eq!(busy.folder, "B");
    assert!(busy.why.contains(".B/dovecot-uidlist.lock") && busy.why.contains(&format!("pid {}", std::process::id())), "{}", busy.why);
    assert_eq!(locks_on_disk(&root), [".B"], "the locks taken in the round are gone");
    assert_eq!(held.release().unwrap(), dotlock::ReleaseOutcome::Released);
}

#[test]
fn lock_one_in_a_deleted_folder_is_nothing_to_lock() {
    let t = tmp();
    let (root, md, found) = maildir_with_folders(&t);
    let a = found.iter().find(|f| f.name == "A").unwrap();
    let dir = Arc::new(md.control_dir(a).unwrap().unwrap());
    fs::remove_dir_all(root.join(".A")).unwrap();
    let set = LockSettings { timeout: Duration::from_millis(50), ..LockSettings::default() };
    assert!(matches!(lock_one(&dir, &set, Duration::from_millis(50)), Ok(Ok(None))));
    // And a folder gone before the locking: not locked, not an error.
    let mut warnings = Vec::new();
    let (locks, _) = dotlock_round(&md, &found, &set, FIRST_LOCK_WAIT, &mut warnings).unwrap().unwrap();
    assert_eq!(locks.locks.len(), 2);
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn a_symlinked_control_dir_is_not_locked_and_warned() {
    let t = tmp();
    let (root, md, found) = maildir_with_folders(&t);
    let elsewhere = t.path().join("elsewhere");
    fs::rename(root.join(".A"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join(".A")).unwrap();
    let mut warnings = Vec::new();
    let (locks, _) = dotlock_round(&md, &found, &LockSettings::default(), FIRST_LOCK_WAIT, &mut warnings).unwrap().unwrap();
    assert_eq!(locks.locks.len(), 2);
    assert!(warnings.iter().any(|w| w.contains("not locked") && w.contains("symlink")), "{warnings:?}");
    assert!(!elsewhere.join("dovecot-uidlist.lock").exists());
    Box::new(locks).release(&mut Vec::new());
}
