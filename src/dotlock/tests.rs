//! The stale-lock rules of `Judge::check`, driven with a chosen "now" (no waiting for a lock
//! to age), and `DotLock` acquire/release in a temp dir.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::time::SystemTime;

use super::*;
use crate::test_support::tmp;

/// A pid no process can have (above Linux's largest pid_max, 2^22).
const DEAD_PID: i32 = 0x7fff_fff0;

/// A lock directory with `<file>.lock` written by hand.
struct Setup {
    t: tempfile::TempDir,
    lock: LockFile,
}

const FILE: &str = "dovecot-uidlist";

impl Setup {
    fn new() -> Setup {
        let t = tmp();
        let dir = Arc::new(Dir::open(t.path()).unwrap());
        Setup { lock: LockFile { dir, name: format!("{FILE}.lock") }, t }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    /// Writes the lock with `content`; returns "now" just after (the lock's ctime or a second later).
    fn write_lock(&self, content: &str) -> i64 {
        fs::write(self.path(&self.lock.name), content).unwrap();
        now_secs()
    }

    fn local(pid: i32) -> String {
        format!("{pid}:{}", my_hostname())
    }

    fn lock_exists(&self) -> bool {
        self.path(&self.lock.name).exists()
    }
}

fn settings(stale_secs: u64) -> LockSettings {
    LockSettings { timeout: Duration::from_secs(1), stale_timeout: Duration::from_secs(stale_secs), use_excl: false, nfs_flush: false }
}

fn is_free(v: Result<Verdict, LockError>) -> bool {
    matches!(v.unwrap(), Verdict::Free)
}

fn is_held(v: Result<Verdict, LockError>) -> bool {
    matches!(v.unwrap(), Verdict::Held)
}

#[test]
fn holder_parses_dovecot_content_only() {
    assert_eq!(Holder::parse(b"123:mail.example"), Some(Holder { pid: 123, host: "mail.example".into() }));
    assert_eq!(Holder::parse(b"123:h\n"), Some(Holder { pid: 123, host: "h".into() }));
    for bad in [&b""[..], b"123", b"123:", b":h", b"0:h", b"-5:h", b"x:h", b"12 :h", b"\xff:h", b"99999999999:h"] {
        assert_eq!(Holder::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(Holder::parse(lock_content().as_bytes()).map(|h| h.pid), Some(std::process::id() as i32));
}

#[test]
fn no_lock_is_free() {
    let s = Setup::new();
    let set = settings(120);
    assert!(is_free(Judge::new(&set, FILE, &s.lock).check(now_secs())));
}

#[test]
fn a_dead_local_holder_is_stale_once_the_lock_is_2s_old() {
    let s = Setup::new();
    let t = s.write_lock(&Setup::local(DEAD_PID));
    let set = settings(120);
    // Just created (under 2 s old): the pid is not judged yet, and it is far from stale by age.
    assert!(is_held(Judge::new(&set, FILE, &s.lock).check(t)));
    assert!(s.lock_exists());
    // Older than 2 s, far from the stale timeout: broken for the dead pid alone.
    assert!(is_free(Judge::new(&set, FILE, &s.lock).check(t + 10)));
    assert!(!s.lock_exists(), "the stale lock is removed");
}

#[test]
fn a_dead_local_holder_is_stale_even_with_stale_timeout_zero() {
    let s = Setup::new();
    let t = s.write_lock(&Setup::local(DEAD_PID));
    assert!(is_free(Judge::new(&settings(0), FILE, &s.lock).check(t + 10)));
}

#[test]
fn a_live_local_holder_is_never_stale() {
    let s = Setup::new();
    // pid 1 always exists (as non-root, kill() says EPERM: alive all the same).
    let t = s.write_lock(&Setup::local(1));
    let set = settings(120);
    let mut j = Judge::new(&set, FILE, &s.lock);
    assert!(is_held(j.check(t + 10)));
    assert!(is_held(j.check(t + 100_000)), "however old");
    // Also when the stale timeout is shorter than the pid check's 2 s grace (--stale-timeout 1).
    let set1 = settings(1);
    assert!(is_held(Judge::new(&set1, FILE, &s.lock).check(t + 2)));
    assert!(s.lock_exists());
}

#[test]
fn a_young_dead_holder_with_a_tiny_stale_timeout_is_broken_by_age() {
    let s = Setup::new();
    let t = s.write_lock(&Setup::local(DEAD_PID));
    assert!(is_free(Judge::new(&settings(1), FILE, &s.lock).check(t + 2)));
}

#[test]
fn a_lock_unchanged_for_the_stale_timeout_is_stale() {
    let s = Setup::new();
    // Another host's pid cannot be checked: only age counts.
    let t = s.write_lock(&format!("{DEAD_PID}:another-host.example"));
    let set = settings(120);
    let mut j = Judge::new(&set, FILE, &s.lock);
    assert!(is_held(j.check(t + 10)));
    assert!(is_held(j.check(t + 100)));
    assert!(s.lock_exists());
    assert!(is_free(j.check(t + 200)));
    assert!(!s.lock_exists());
}

#[test]
fn unreadable_content_is_judged_by_age_only() {
    let s = Setup::new();
    let t = s.write_lock("garbage");
    let set = settings(120);
    assert!(is_held(Judge::new(&set, FILE, &s.lock).check(t + 10)));
    assert!(is_free(Judge::new(&set, FILE, &s.lock).check(t + 200)));
}

#[test]
fn stale_timeout_zero_never_breaks_by_age() {
    let s = Setup::new();
    let t = s.write_lock(&format!("{DEAD_PID}:another-host.example"));
    let set = settings(0);
    assert!(is_held(Judge::new(&set, FILE, &s.lock).check(t + 10_000_000)));
    assert!(s.lock_exists());
}

#[test]
fn a_lock_that_changes_while_watched_is_not_stale() {
    let s = Setup::new();
    let t = s.write_lock(&format!("{DEAD_PID}:another-host.example"));
    let set = settings(120);
    let mut j = Judge::new(&set, FILE, &s.lock);
    assert!(is_held(j.check(t + 100)));
    // Its holder rewrites it (a new size): a change seen at t+150 restarts the clock.
    fs::write(s.path(&s.lock.name), format!("{DEAD_PID}:another-host.example\n")).unwrap();
    assert!(is_held(j.check(t + 150)));
    assert!(is_held(j.check(t + 250)));
    assert!(is_free(j.check(t + 300)));
}

#[test]
fn a_change_of_the_protected_file_counts_as_a_live_holder() {
    let s = Setup::new();
    let t = s.write_lock(&format!("{DEAD_PID}:another-host.example"));
    // The uidlist was written after the lock was taken (its mtime later than the lock's).
    let f = fs::File::create(s.path(FILE)).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs((t + 150) as u64)).unwrap();
    let set = settings(120);
    let mut j = Judge::new(&set, FILE, &s.lock);
    assert!(is_held(j.check(t + 200)), "the lock is old, but the uidlist changed 50 s ago");
    assert!(is_held(j.check(t + 260)));
    assert!(is_free(j.check(t + 300)), "neither changed for 120 s");
}

#[test]
fn a_lock_naming_our_pid_is_ours_only_while_we_hold_it() {
    let s = Setup::new();
    let set = settings(1);
    // Held by this process (another thread's DotLock): never broken, whatever its age.
    let held = DotLock::acquire_in(&s.lock.dir, FILE, &set).unwrap();
    let t = now_secs();
    let mut j = Judge::new(&set, FILE, &s.lock);
    assert!(is_held(j.check(t + 10)));
    assert!(is_held(j.check(t + 100_000)));
    assert_eq!(held.release().unwrap(), ReleaseOutcome::Released);
    // Our pid in a lock we do not hold (left by an earlier process with our pid): stale.
    let t = s.write_lock(&lock_content());
    assert!(is_free(Judge::new(&settings(120), FILE, &s.lock).check(t + 10)));
}

#[test]
fn a_lock_replaced_after_it_was_judged_is_not_broken() {
    let s = Setup::new();
    let t = s.write_lock(&format!("{DEAD_PID}:another-host.example"));
    let set = settings(120);
    let mut j = Judge::new(&set, FILE, &s.lock);
    assert!(is_held(j.check(t + 10)));
    let judged = j.lock_seen;
    // Someone breaks it and takes the lock anew (a new inode; the old one kept alive so its
    // number cannot be reused).
    fs::hard_link(s.path(&s.lock.name), s.path("old")).unwrap();
    fs::write(s.path("new"), Setup::local(1)).unwrap();
    fs::rename(s.path("new"), s.path(&s.lock.name)).unwrap();
    assert!(is_held(j.break_lock(judged)));
    assert_eq!(fs::read_to_string(s.path(&s.lock.name)).unwrap(), Setup::local(1), "their lock is left alone");
}

#[test]
fn a_lock_name_that_is_not_a_file_is_refused_and_left_alone() {
    let s = Setup::new();
    let set = settings(1);
    std::os::unix::fs::symlink("/etc/passwd", s.path(&s.lock.name)).unwrap();
    assert!(matches!(Judge::new(&set, FILE, &s.lock).check(now_secs() + 1000), Err(LockError::NotAFile { kind: "a symlink", .. })));
    fs::remove_file(s.path(&s.lock.name)).unwrap();
    nix::unistd::mkfifo(&s.path(&s.lock.name), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(matches!(DotLock::acquire_in(&s.lock.dir, FILE, &set), Err(LockError::NotAFile { kind: "a special file", .. })));
    assert!(fs::symlink_metadata(s.path(&s.lock.name)).unwrap().file_type().is_fifo());
}

/// Names in the lock dir other than the protected file's (no post left behind).
fn others(s: &Setup) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(s.t.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != FILE).collect();
    v.sort();
    v
}

#[test]
fn acquire_and_release_in_both_modes() {
    for use_excl in [false, true] {
        let s = Setup::new();
        let set = LockSettings { use_excl, ..settings(120) };
        let l = DotLock::acquire_in(&s.lock.dir, FILE, &set).unwrap();
        assert_eq!(others(&s), [s.lock.name.as_str()], "use_excl {use_excl}: only the lock, no post left");
        assert_eq!(fs::read_to_string(s.path(&s.lock.name)).unwrap(), lock_content());
        assert_eq!(l.lock_path(), s.path(&s.lock.name));
        assert_eq!(l.release().unwrap(), ReleaseOutcome::Released);
        assert!(others(&s).is_empty());
    }
    // By path, and released on drop.
    let s = Setup::new();
    {
        let _l = DotLock::acquire(&s.path(FILE), &settings(120)).unwrap();
        assert!(s.lock_exists());
    }
    assert!(!s.lock_exists());
}

#[test]
fn a_second_acquire_while_held_times_out() {
    let s = Setup::new();
    let first = DotLock::acquire_in(&s.lock.dir, FILE, &settings(120)).unwrap();
    let quick = LockSettings { timeout: Duration::from_millis(50), ..settings(120) };
    let started = Instant::now();
    let r = DotLock::acquire_in(&s.lock.dir, FILE, &quick);
    let Err(LockError::Timeout { holder, path, .. }) = r else { panic!("expected a timeout, got {r:?}") };
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(holder, format!("pid {} on host {}", std::process::id(), my_hostname()));
    assert_eq!(path, s.path(&s.lock.name));
    // Zero: one try.
    let once = LockSettings { timeout: Duration::ZERO, ..settings(120) };
    assert!(matches!(DotLock::acquire_in(&s.lock.dir, FILE, &once), Err(LockError::Timeout { .. })));
    assert_eq!(others(&s), [s.lock.name.as_str()], "no post left behind by the waiters");
    assert_eq!(first.release().unwrap(), ReleaseOutcome::Released);
    DotLock::acquire_in(&s.lock.dir, FILE, &once).unwrap().release().unwrap();
}

#[test]
fn release_never_removes_a_lock_that_is_no_longer_ours() {
    let set = settings(120);
    // Replaced by someone else's (a new file renamed over ours).
    let s = Setup::new();
    let l = DotLock::acquire_in(&s.lock.dir, FILE, &set).unwrap();
    fs::write(s.path("theirs"), Setup::local(1)).unwrap();
    fs::rename(s.path("theirs"), s.path(&s.lock.name)).unwrap();
    assert_eq!(l.release().unwrap(), ReleaseOutcome::Overridden);
    assert_eq!(fs::read_to_string(s.path(&s.lock.name)).unwrap(), Setup::local(1), "theirs left in place");
    // Same inode, other content (our inode number reused for their lock).
    let s = Setup::new();
    let l = DotLock::acquire_in(&s.lock.dir, FILE, &set).unwrap();
    fs::write(s.path(&s.lock.name), Setup::local(1)).unwrap();
    assert_eq!(l.release().unwrap(), ReleaseOutcome::Overridden);
    assert!(s.lock_exists());
    // Deleted.
    let s = Setup::new();
    let l = DotLock::acquire_in(&s.lock.dir, FILE, &set).unwrap();
    fs::remove_file(s.path(&s.lock.name)).unwrap();
    assert_eq!(l.release().unwrap(), ReleaseOutcome::Deleted);
    // Replaced by a directory: not ours, not touched.
    let s = Setup::new();
    let l = DotLock::acquire_in(&s.lock.dir, FILE, &set).unwrap();
    fs::remove_file(s.path(&s.lock.name)).unwrap();
    fs::create_dir(s.path(&s.lock.name)).unwrap();
    assert_eq!(l.release().unwrap(), ReleaseOutcome::Overridden);
    assert!(s.path(&s.lock.name).is_dir());
}

#[test]
fn release_warnings_say_what_happened() {
    let p = Path::new("/m/dovecot-uidlist.lock");
    assert_eq!(release_warning(p, ReleaseOutcome::Released, Duration::from_secs(1)), None);
    assert!(release_warning(p, ReleaseOutcome::Deleted, Duration::from_secs(1)).unwrap().contains("deleted by someone else"));
    assert!(release_warning(p, ReleaseOutcome::Overridden, Duration::from_secs(1)).unwrap().contains("overridden"));
}
