//! `lock_all_or_none` with simulated locks (it is generic over what a lock is), and the
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
    let mut attempts = 0;
    let (locks, _since) = lock_all_or_none(3, Duration::from_secs(60), &mut attempts, |i, wait| {
        waits.push(wait);
        log.borrow_mut().push(format!("take {i}"));
        Ok(Ok(Fake { i, log: log.clone() }))
    })
    .unwrap();
    assert_eq!(attempts, 1);
    assert_eq!(locks.iter().map(|l| l.i).collect::<Vec<_>>(), [0, 1, 2]);
    // The first lock, holding none, may wait a while; the others only a moment.
    assert_eq!(waits, [FIRST_LOCK_WAIT, NEXT_LOCK_WAIT, NEXT_LOCK_WAIT]);
    assert_eq!(*log.borrow(), ["take 0", "take 1", "take 2"], "nothing released while held");
    drop(locks);
    assert_eq!(log.borrow().len(), 6);
}

#[test]
fn one_busy_lock_releases_all_taken_and_is_tried_first_next_round() {
    let log = log();
    let mut attempts = 0;
    let mut tries_of_2 = 0;
    let mut waits = Vec::new();
    let (locks, _) = lock_all_or_none(3, Duration::from_secs(60), &mut attempts, |i, wait| {
        waits.push((i, wait));
        if i == 2 {
            tries_of_2 += 1;
            if tries_of_2 == 1 {
                log.borrow_mut().push(format!("busy {i}"));
                return Ok(Err(format!("lock {i} held by pid 1")));
            }
        }
        log.borrow_mut().push(format!("take {i}"));
        Ok(Ok(Fake { i, log: log.clone() }))
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(locks.len(), 3);
    let log = log.borrow();
    // Never holding 0 and 1 while waiting again: both let go before the next round starts.
    assert_eq!(log[..4], ["take 0", "take 1", "busy 2", "release 0"]);
    assert!(log[4] == "release 1");
    // The busy one goes first, with the long wait while nothing is held.
    assert_eq!(log[5..], ["take 2", "take 0", "take 1"]);
    assert_eq!(waits[3..], [(2, FIRST_LOCK_WAIT), (0, NEXT_LOCK_WAIT), (1, NEXT_LOCK_WAIT)]);
}

#[test]
fn a_folder_busy_for_longer_than_the_short_wait_still_gets_locked() {
    // Folder 1 is busy whenever it is tried with the short wait (Dovecot keeps taking it
    // for a few ms): all-or-none rounds in a fixed order would never win.
    let mut attempts = 0;
    let (locks, _) = lock_all_or_none(4, Duration::from_secs(60), &mut attempts, |i, wait| {
        if i == 1 && wait < FIRST_LOCK_WAIT {
            return Ok(Err("busy for 30 ms".to_string()));
        }
        Ok(Ok(i))
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(locks, [1, 0, 2, 3]);
}

#[test]
fn a_lock_that_stays_busy_times_out_counting_attempts() {
    let log = log();
    let mut attempts = 5; // counted on from earlier rounds of the same backup
    let mut rounds = 0;
    let timeout = Duration::from_millis(150);
    let started = Instant::now();
    let r = lock_all_or_none(2, timeout, &mut attempts, |i, wait| {
        assert!(wait <= timeout, "never asked to wait past the deadline: {wait:?}");
        if i == 1 {
            rounds += 1;
            return Ok(Err(format!("busy in round {rounds}")));
        }
        Ok(Ok(Fake { i, log: log.clone() }))
    });
    let Err(BackupError::LockTimeout { timeout: t, waited, attempts: n, why }) = r else { panic!("expected LockTimeout") };
    assert_eq!(t, timeout, "the timeout asked for is reported");
    assert!(rounds >= 1);
    assert_eq!((n, attempts), (5 + rounds, 5 + rounds));
    assert_eq!(why, format!("busy in round {rounds}"), "the last reason is reported");
    assert!(waited >= timeout && started.elapsed() < Duration::from_secs(5), "{waited:?}");
    // Every lock taken was let go: lock 0 in the first round only; after that the busy one
    // is tried first, so nothing is held while it is waited for.
    let log = log.borrow();
    assert_eq!(log.iter().filter(|l| l.starts_with("release")).count(), 1, "{log:?}");
}

#[test]
fn a_zero_timeout_tries_once() {
    let mut attempts = 0;
    let mut calls = 0;
    let r: Result<(Vec<()>, _), _> = lock_all_or_none(1, Duration::ZERO, &mut attempts, |_, wait| {
        calls += 1;
        assert_eq!(wait, Duration::ZERO);
        Ok(Err("busy".to_string()))
    });
    assert!(matches!(r, Err(BackupError::LockTimeout { attempts: 1, .. })));
    assert_eq!((attempts, calls), (1, 1));
}

#[test]
fn a_huge_timeout_is_no_overflow() {
    let mut attempts = 0;
    let (locks, _) = lock_all_or_none(2, Duration::MAX, &mut attempts, |i, wait| {
        assert_eq!(wait, if i == 0 { FIRST_LOCK_WAIT } else { NEXT_LOCK_WAIT });
        Ok(Ok(i))
    })
    .unwrap();
    assert_eq!(locks, [0, 1]);
}

#[test]
fn a_gone_folder_counts_as_locked_and_an_error_stops_at_once() {
    // dotlock_all's locks are Option<DotLock>: None for a folder deleted meanwhile.
    let mut attempts = 0;
    let (locks, _) = lock_all_or_none(3, Duration::from_secs(60), &mut attempts, |i, _| Ok(Ok((i != 1).then_some(i)))).unwrap();
    assert_eq!((locks, attempts), (vec![Some(0), None, Some(2)], 1));

    let log = log();
    let mut calls = 0;
    let r = lock_all_or_none(3, Duration::from_secs(60), &mut attempts, |i, _| {
        calls += 1;
        if i == 1 {
            return Err(BackupError::NotMaildir("x".into()));
        }
        Ok(Ok(Fake { i, log: log.clone() }))
    });
    assert!(matches!(r, Err(BackupError::NotMaildir(_))));
    assert_eq!(calls, 2, "no retry after a real error");
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
fn dotlock_all_locks_every_folder_and_releases_them() {
    let t = tmp();
    let (root, md, found) = maildir_with_folders(&t);
    let set = LockSettings { timeout: Duration::from_secs(5), ..LockSettings::default() };
    let (mut attempts, mut warnings) = (0, Vec::new());
    let (locks, _) = dotlock_all(&md, &found, &set, &mut attempts, &mut warnings).unwrap();
    assert_eq!((attempts, locks.locks.len()), (1, 3));
    assert_eq!(locks_on_disk(&root), ["", ".A", ".B"]);
    let content = fs::read_to_string(root.join(".A/dovecot-uidlist.lock")).unwrap();
    assert_eq!(content, dotlock::lock_content());
    let mut w = Vec::new();
    Box::new(locks).release(&mut w);
    assert!(w.is_empty(), "{w:?}");
    assert!(locks_on_disk(&root).is_empty());
}

#[test]
fn dotlock_all_times_out_on_a_held_lock_and_holds_nothing_after() {
    let t = tmp();
    let (root, md, found) = maildir_with_folders(&t);
    // .B's lock is held (by us, through another lock: never broken, never stale).
    let held = DotLock::acquire(&root.join(".B/dovecot-uidlist"), &LockSettings::default()).unwrap();
    let set = LockSettings { timeout: Duration::from_millis(100), ..LockSettings::default() };
    let (mut attempts, mut warnings) = (0, Vec::new());
    let r = dotlock_all(&md, &found, &set, &mut attempts, &mut warnings);
    let Err(BackupError::LockTimeout { attempts: n, why, .. }) = r else { panic!("expected LockTimeout") };
    assert!(n >= 1 && n == attempts);
    assert!(why.contains(".B/dovecot-uidlist.lock") && why.contains(&format!("pid {}", std::process::id())), "{why}");
    assert_eq!(locks_on_disk(&root), [".B"], "the locks taken in the failed rounds are gone");
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
    let (mut attempts, mut warnings) = (0, Vec::new());
    let (locks, _) = dotlock_all(&md, &found, &set, &mut attempts, &mut warnings).unwrap();
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
    let set = LockSettings { timeout: Duration::from_secs(5), ..LockSettings::default() };
    let (mut attempts, mut warnings) = (0, Vec::new());
    let (locks, _) = dotlock_all(&md, &found, &set, &mut attempts, &mut warnings).unwrap();
    assert_eq!(locks.locks.len(), 2);
    assert!(warnings.iter().any(|w| w.contains("not locked") && w.contains("symlink")), "{warnings:?}");
    assert!(!elsewhere.join("dovecot-uidlist.lock").exists());
    Box::new(locks).release(&mut Vec::new());
}
