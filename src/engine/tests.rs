//! The reconcile's rounds on a hand-made Maildir with real dot-locks: a lock held longer than
//! a round waits is waited for holding none, and one that stays held ends in a clear timeout.
//! And the waves the folders' records are written in.

use std::path::Path;
use std::time::{Duration, Instant};

use super::*;
use crate::dotlock::{DotLock, LockSettings};
use crate::maildir::MailLocation;
use crate::test_support::*;

fn maildir(t: &tempfile::TempDir) -> std::path::PathBuf {
    let root = t.path().join("Maildir");
    make_maildir(&root, &[".A", ".B"]);
    put(&root.join(".B"), "cur", "1.M1P1.h:2,S", &body("1"));
    root
}

fn opts(timeout: Duration) -> BackupOptions {
    BackupOptions { lock: LockSettings { timeout, ..LockSettings::default() }, ..BackupOptions::default() }
}

/// Holds `file`'s dot-lock (as this process: never judged stale) for `hold`, from a thread.
fn hold_for(file: &Path, hold: Duration) -> std::thread::JoinHandle<()> {
    let lock = DotLock::acquire(file, &LockSettings::default()).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(hold);
        lock.release().unwrap();
    })
}

#[test]
fn a_lock_held_longer_than_a_round_waits_is_waited_for_and_taken() {
    let t = tmp();
    let root = maildir(&t);
    // Before the lock is taken: it is let go 400 ms after that at the earliest.
    let started = Instant::now();
    let holder = hold_for(&root.join(".B/dovecot-uidlist"), Duration::from_millis(400));
    let r = backup(&MailLocation::plain(&root), &t.path().join("out"), &opts(Duration::from_secs(30))).unwrap();
    holder.join().unwrap();
    assert!(r.lock_attempts >= 2, "the first round found .B busy: {}", r.lock_attempts);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(r.messages, 1);
    assert!(r.lock_hold_ms < 400.0, "the busy lock was not waited for while holding others: {} ms", r.lock_hold_ms);
    assert!(!root.join("dovecot-uidlist.lock").exists() && !root.join(".A/dovecot-uidlist.lock").exists());
}

#[test]
fn a_lock_that_stays_held_times_out_naming_its_folder() {
    let t = tmp();
    let root = maildir(&t);
    let holder = hold_for(&root.join(".B/dovecot-uidlist"), Duration::from_secs(3));
    let started = Instant::now();
    let out = t.path().join("out");
    let r = backup(&MailLocation::plain(&root), &out, &opts(Duration::from_millis(500)));
    let waited_here = started.elapsed();
    let Err(BackupError::LockTimeout { timeout, rounds, folders, why, .. }) = r else { panic!("expected LockTimeout, got {r:?}") };
    assert_eq!(timeout, Duration::from_millis(500));
    assert!(rounds >= 1 && folders.starts_with(&format!("B ({rounds}×)")), "{rounds} {folders}");
    assert!(why.contains(".B/dovecot-uidlist.lock"), "{why}");
    assert!(waited_here < Duration::from_secs(3), "gave up at the timeout, not when the lock was let go: {waited_here:?}");
    assert!(!out.exists(), "nothing published");
    assert!(!root.join("dovecot-uidlist.lock").exists() && !root.join(".A/dovecot-uidlist.lock").exists());
    holder.join().unwrap();
}

#[test]
fn a_zero_lock_timeout_tries_one_round() {
    let t = tmp();
    let root = maildir(&t);
    let holder = hold_for(&root.join(".A/dovecot-uidlist"), Duration::from_millis(300));
    let r = backup(&MailLocation::plain(&root), &t.path().join("out"), &opts(Duration::ZERO));
    let Err(BackupError::LockTimeout { rounds: 1, folders, .. }) = r else { panic!("expected one round, got {r:?}") };
    assert_eq!(folders, "A (1×)");
    holder.join().unwrap();
}

#[test]
fn folder_records_are_written_in_waves_of_bounded_size() {
    let sizes = [50_000u64, 60_000, 200_000, 1, 1];
    let waves: Vec<Vec<u64>> = super::waves(&sizes, |&n| n, 100_000).into_iter().map(<[u64]>::to_vec).collect();
    assert_eq!(waves, vec![vec![50_000], vec![60_000], vec![200_000], vec![1, 1]]);
    assert!(super::waves(&[] as &[u64], |&n| n, 1).is_empty());
}
