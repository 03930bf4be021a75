//! `lock` / `maildirlock` against a real Dovecot 2.3 and 2.4: each side waits for the other's lock.
//!
//! `maildir-backup lock` / `maildirlock` against a real Dovecot (2.3 on the host, 2.4 in the Debian 13 root;
//! tests/support): Dovecot waits for our lock, and we wait for Dovecot's.
//!
//! To have a *real* Dovecot process hold its own uidlist lock for as long as a test needs, the imap
//! processes get a tiny LD_PRELOAD shim (HOLD_SHIM in tests/support/procs.rs, passed through Dovecot's
//! `import_environment`): it changes nothing, except that once "armed" (a file `arm` in MB_HOLD_DIR)
//! the first process that creates a `dovecot-uidlist.lock` (Dovecot's own file_dotlock code: O_EXCL
//! open + write of `<pid>:<host>`, or link() of a written temp file) pauses right after the lock is
//! complete, reports `held.<pid>`, and goes on when the test creates `release`. So the lock is made,
//! held and removed by Dovecot itself. (/usr/lib/dovecot/maildirlock, the obvious tool, is broken in
//! 2.3.19.1: its child panics at once and locks nothing.)

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::procs::{build_hold_shim, files_in, host, lock_cmd, mb, run, run_maildirlock, secs, spawn, wait_until};
use support::trixie::{chown_vmail_recursive_root, in_root, tempdir_in_root};
use support::{message, tempdir, Dovecot, Dovecot24, DovecotOptions, Imap, Instance, Release, Run, EX_TEMPFAIL};

const LOCK: &str = "dovecot-uidlist.lock";

// ---------------------------------------------------------------------------------------------
// helpers

/// Appends one unflagged message (it lands in new/, so the next SELECT must sync, i.e. take the
/// uidlist lock) and returns the mailbox's control dir, where `dovecot-uidlist` now exists.
fn prepare_mailbox(d: &Dovecot, mailbox: &str) -> PathBuf {
    let mut imap = d.imap("alice");
    if mailbox != "INBOX" {
        imap.create(mailbox).unwrap_or_else(|e| panic!("CREATE {mailbox}: {e}"));
    }
    imap.append(mailbox, "", &message(1, 300)).unwrap_or_else(|e| panic!("APPEND: {e}\n{}", d.log_tail()));
    imap.logout();
    let control = d.mailbox_path("alice", mailbox, "control");
    assert!(control.join("dovecot-uidlist").exists(), "no uidlist in {}: {:?}", control.display(), files_in(&control));
    let maildir = d.mailbox_path("alice", mailbox, "mailbox");
    assert!(!files_in(&maildir.join("new")).is_empty(), "the appended message is not in new/");
    control
}

/// Sends SELECT on a fresh connection; the caller polls for its completion.
fn start_select<R: Release>(d: &Instance<R>, mailbox: &str) -> (Imap, String) {
    let mut imap = d.imap("alice");
    let tag = imap.send_raw(&format!("SELECT {}", support::imap_quote(mailbox)));
    (imap, tag)
}

/// Writes a message file straight into `mail_dir/new/` (host side, owned by vmail), as a delivery agent
/// would: it has no UID yet, so the next SELECT must sync, i.e. take the uidlist lock.
fn drop_into_new(mail_dir: &Path, n: usize) -> PathBuf {
    let p = mail_dir.join("new").join(format!("1700000000.M{n}P4242.d24test"));
    fs::write(&p, message(900 + n, 300)).unwrap();
    chown_vmail_recursive_root(&p);
    p
}

/// Creates `mailbox` (unless INBOX) and appends one message with IMAP, then drops one more file into its
/// new/ (see [`drop_into_new`]); 2.4; returns `(mail dir, control dir)` as host paths.
fn prepare_mailbox_24(d: &Dovecot24, mailbox: &str, n: usize) -> (PathBuf, PathBuf) {
    let mut imap = d.imap("alice");
    if mailbox != "INBOX" {
        imap.create(mailbox).unwrap_or_else(|e| panic!("CREATE {mailbox}: {e}"));
    }
    imap.append(mailbox, "", &message(n, 300)).unwrap_or_else(|e| panic!("APPEND: {e}\n{}", d.log_tail()));
    imap.logout();
    let control = d.mailbox_path("alice", mailbox, "control");
    let mail = d.mailbox_path("alice", mailbox, "mailbox");
    assert!(control.join("dovecot-uidlist").exists(), "no uidlist in {}: {:?}", control.display(), files_in(&control));
    drop_into_new(&mail, n);
    (mail, control)
}

// ---------------------------------------------------------------------------------------------
// Dovecot waits for our lock

fn dovecot_waits_for_our_lock(opts: DovecotOptions, mailbox: &str) {
    let d = Dovecot::start(opts);
    let control = prepare_mailbox(&d, mailbox);
    select_waits_for_our_lock(&d, &control, mailbox, " EXISTS");
    d.assert_clean_log();
}

/// `maildir-backup lock CONTROL -- sh -c '…wait for release…'` holds the uidlist lock of `mailbox` (whose
/// control dir is `control`): a SELECT of it waits until we release, then completes, with a line ending in
/// `exists`; no lock is left.
fn select_waits_for_our_lock<R: Release>(d: &Instance<R>, control: &Path, mailbox: &str, exists: &str) {
    let lock = control.join(LOCK);
    let out = tempdir();
    let inside = out.path().join("inside");
    let release = out.path().join("release");

    let holder = spawn(lock_cmd(
        control,
        &[],
        &[
            "sh",
            "-c",
            r#"touch "$1"; while [ ! -e "$2" ]; do sleep 0.05; done"#,
            "sh",
            inside.to_str().unwrap(),
            release.to_str().unwrap(),
        ],
    ));
    assert!(wait_until(secs(10.0), || inside.exists()), "holder did not get the lock");
    assert_eq!(fs::read_to_string(&lock).unwrap(), format!("{}:{}", holder.pid(), host()));

    let (mut imap, tag) = start_select(d, mailbox);
    let blocked = imap.poll_tagged(&tag, secs(2.5));
    let still_ours = fs::read_to_string(&lock).ok();
    fs::write(&release, "").unwrap();
    assert!(blocked.is_none(), "{} SELECT completed while we held the lock: {blocked:?}", R::NAME);
    assert_eq!(still_ours, Some(format!("{}:{}", holder.pid(), host())), "{} took our lock away", R::NAME);

    let released_at = Instant::now();
    let h = holder.wait(secs(10.0));
    assert_eq!(h.code(), Some(0), "{}", h.show());
    assert!(h.stderr.is_empty(), "holder warned: {}", h.show());
    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT still blocked 10 s after our release");
    let lines = r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(lines.iter().any(|l| l.ends_with(exists)), "{lines:?}");
    eprintln!("SELECT completed {:.2?} after our release", released_at.elapsed());
    assert!(wait_until(secs(5.0), || !lock.exists()), "a lock is left");
    imap.logout();
}

/// `pid=$(maildir-backup maildirlock CONTROL TIMEOUT)` holds the INBOX uidlist lock (`control` is INBOX's
/// control dir): a SELECT waits until the holder gets SIGTERM, then completes; no lock is left, nothing
/// on stderr.
fn select_waits_for_maildirlock<R: Release>(d: &Instance<R>, control: &Path, timeout: &str) {
    let lock = control.join(LOCK);
    let errs = tempdir();
    let (status, pid) = run_maildirlock(control, timeout, &errs.path().join("err"));
    assert!(status.success(), "{}", fs::read_to_string(errs.path().join("err")).unwrap());
    let pid: i32 = pid.parse().unwrap_or_else(|_| panic!("not a pid: {pid:?}"));
    assert_eq!(fs::read_to_string(&lock).unwrap(), format!("{pid}:{}", host()));

    let (mut imap, tag) = start_select(d, "INBOX");
    let blocked = imap.poll_tagged(&tag, secs(2.5));
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert!(blocked.is_none(), "{} SELECT completed while maildirlock held the lock: {blocked:?}", R::NAME);
    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT still blocked after kill -TERM");
    r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(wait_until(secs(5.0), || !lock.exists()), "maildirlock left its lock");
    assert_eq!(fs::read_to_string(errs.path().join("err")).unwrap(), "");
    imap.logout();
}

#[test]
fn dovecot_waits_for_our_lock_inbox() {
    dovecot_waits_for_our_lock(DovecotOptions::default(), "INBOX");
}

#[test]
fn dovecot_waits_for_our_lock_folder_with_control_dir() {
    dovecot_waits_for_our_lock(DovecotOptions { control: true, excl: false, ..DovecotOptions::default() }, "Archive");
}

#[test]
fn dovecot_waits_for_our_maildirlock() {
    let d = Dovecot::start(DovecotOptions::default());
    let control = prepare_mailbox(&d, "INBOX");
    // pid=$(maildir-backup maildirlock DIR 10)
    select_waits_for_maildirlock(&d, &control, "10");
    d.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// We wait for Dovecot's lock

/// A Dovecot whose processes carry HOLD_SHIM. Dropping `HoldCtl` releases any held lock.
struct HoldCtl {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl HoldCtl {
    fn arm(&self) {
        let _ = fs::remove_file(self.path.join("release"));
        fs::write(self.path.join("arm"), "").unwrap();
    }
    fn release(&self) {
        fs::write(self.path.join("release"), "").unwrap();
    }
    /// pid of the Dovecot process holding the lock, once it does.
    fn holder(&self, limit: Duration) -> Option<i32> {
        let mut pid = None;
        wait_until(limit, || {
            pid = files_in(&self.path).iter().find_map(|n| n.strip_prefix("held.").and_then(|p| p.parse().ok()));
            pid.is_some()
        });
        pid
    }
}

impl Drop for HoldCtl {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("release"), "");
    }
}

fn dovecot_with_hold_shim(mut opts: DovecotOptions) -> (Dovecot, HoldCtl) {
    let dir = tempdir();
    let (so, ctl) = build_hold_shim(dir.path());
    opts.extra_conf.push_str(&format!(
        "import_environment = TZ LD_PRELOAD={} MB_HOLD_DIR={}\n",
        so.display(),
        ctl.display()
    ));
    let d = Dovecot::start(opts);
    (d, HoldCtl { _dir: dir, path: ctl })
}

fn support_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn proc_comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

fn we_wait_for_dovecots_lock(excl: bool) {
    let (d, hold) = dovecot_with_hold_shim(DovecotOptions { excl, ..DovecotOptions::default() });
    let control = prepare_mailbox(&d, "INBOX");
    let lock = control.join(LOCK);
    let out = tempdir();
    let ran = out.path().join("ran");

    // A client's SELECT makes its imap process lock the uidlist (to move the new message to cur/).
    hold.arm();
    let (mut imap, tag) = start_select(&d, "INBOX");
    let Some(dpid) = hold.holder(secs(10.0)) else {
        panic!("no Dovecot process took the uidlist lock (is the shim loaded?)\n{}", d.log_tail())
    };
    assert_eq!(proc_comm(dpid), "imap", "the lock holder should be Dovecot's imap process");
    let content = fs::read_to_string(&lock).expect("Dovecot's lock file");
    assert_eq!(content, format!("{dpid}:{}", host()), "Dovecot's lock format");
    let ino = fs::metadata(&lock).unwrap().ino();

    // Our lock waits and gives up with 75, leaving Dovecot's lock alone: while the lock is young
    // (not yet judged by its pid, as in Dovecot) even with a stale timeout shorter than the wait,
    // with the defaults, and once it is old, again with a tiny stale timeout. A live local pid is
    // never overridden.
    for (opts, min_age) in [
        (&["--stale-timeout", "1", "--timeout", "2.5"][..], 0),
        (&["--timeout", "2"][..], 0),
        (&["--stale-timeout", "1", "--timeout", "2"][..], 4),
    ] {
        let mtime = fs::metadata(&lock).unwrap().mtime();
        while support_now() < mtime + min_age {
            thread::sleep(secs(0.1));
        }
        let done = run(lock_cmd(&control, opts, &["touch", ran.to_str().unwrap()]), secs(20.0));
        assert_eq!(done.code(), Some(EX_TEMPFAIL), "{opts:?}: {}", done.show());
        assert!(done.elapsed >= secs(1.9), "{}", done.show());
        assert!(done.stderr.contains(&format!("pid {dpid}")), "message should name Dovecot's pid: {}", done.show());
        assert!(!ran.exists(), "{opts:?}: our command ran while Dovecot held the lock");
        assert_eq!(fs::read_to_string(&lock).ok().as_ref(), Some(&content), "{opts:?}: Dovecot's lock was broken");
        assert_eq!(fs::metadata(&lock).unwrap().ino(), ino, "{opts:?}: Dovecot's lock was replaced");
    }

    // Waiting never leaves a post of ours (`.temp.<host>.<pid>.<hex>`) behind. (Dovecot's own
    // `temp.<host>.<pid>.<hex>` may be there: in link mode the shim paused it between link() and
    // unlinking its temp file.)
    assert!(!files_in(&control).iter().any(|n| n.starts_with(".temp.")), "post left: {:?}", files_in(&control));

    // Dovecot finishes; its SELECT completes and it removes its lock; now we get it.
    assert!(imap.poll_tagged(&tag, secs(0.1)).is_none(), "SELECT finished while its process was paused?");
    hold.release();
    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT did not complete after the hold");
    r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(wait_until(secs(5.0), || !lock.exists()), "Dovecot did not remove its lock");
    let done = run(lock_cmd(&control, &["--timeout", "5"], &["touch", ran.to_str().unwrap()]), secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(ran.exists());
    imap.logout();
    d.assert_clean_log();
}

#[test]
fn we_wait_for_dovecots_lock_excl_mode() {
    we_wait_for_dovecots_lock(true);
}

#[test]
fn we_wait_for_dovecots_lock_link_mode() {
    we_wait_for_dovecots_lock(false);
}

// ---------------------------------------------------------------------------------------------
// Dovecot 2.4

/// Our `lock DIR -- CMD` and `maildirlock DIR 5` hold a lock that Dovecot 2.4's imap honours: a SELECT that
/// must assign a UID (a file dropped into new/) waits until we release, then completes. Control dirs are
/// split out (`mail_control_path`) and dotlocks use link() (`dotlock_use_excl = no`).
#[test]
fn d24_our_lock_and_maildirlock_make_select_wait() {
    let t0 = Instant::now();
    let d = Dovecot24::start(DovecotOptions { control: true, excl: false, ..Default::default() });
    let (_, control) = prepare_mailbox_24(&d, "Archive", 1);
    assert!(control.starts_with(d.control_root("alice")), "{}", control.display());
    select_waits_for_our_lock(&d, &control, "Archive", "2 EXISTS");

    // pid=$(maildir-backup maildirlock CONTROL 5) — the replacement for the tool 2.4 removed.
    let (_, control) = prepare_mailbox_24(&d, "INBOX", 2);
    assert_eq!(control, d.control_root("alice").join(".INBOX"));
    select_waits_for_maildirlock(&d, &control, "5");
    d.assert_clean_log();
    eprintln!("d24_our_lock_and_maildirlock_make_select_wait: {:.1?}", t0.elapsed());
}

/// While Dovecot 2.4's own imap process holds the uidlist lock it made (`<its pid>:<host>`, paused by the
/// hold shim in the middle of a SELECT), `maildir-backup lock --timeout 2` gives up with 75 naming that pid
/// and leaves the lock alone; once Dovecot is done, our lock succeeds.
#[test]
fn d24_lock_held_by_dovecot_times_out_75() {
    let t0 = Instant::now();
    let shim = tempdir_in_root();
    let (so, ctl) = build_hold_shim(shim.path()); // support::procs::HOLD_SHIM
    // 2.4: import_environment is a strlist (2.3: a space-separated string); entries add to the defaults.
    let d = Dovecot24::start(DovecotOptions {
        extra_conf: format!("import_environment {{\n  LD_PRELOAD = {}\n  MB_HOLD_DIR = {}\n}}\n", in_root(&so), in_root(&ctl)),
        ..Default::default()
    });
    let (_, control) = prepare_mailbox_24(&d, "INBOX", 1);
    let lock = control.join(LOCK);
    let ran = shim.path().join("ran");

    fs::write(ctl.join("arm"), "").unwrap();
    let (mut imap, tag) = start_select(&d, "INBOX");
    let mut dpid: Option<i32> = None;
    wait_until(secs(10.0), || {
        dpid = files_in(&ctl).iter().find_map(|n| n.strip_prefix("held.").and_then(|p| p.parse().ok()));
        dpid.is_some()
    });
    let release = || {
        let _ = fs::write(ctl.join("release"), "");
    };
    let Some(dpid) = dpid else {
        release();
        panic!("no Dovecot 2.4 process took the uidlist lock (is the shim loaded?)\n{}", d.log_tail())
    };
    let comm = fs::read_to_string(format!("/proc/{dpid}/comm")).unwrap_or_default();
    let content = fs::read_to_string(&lock).expect("Dovecot's lock file");
    let ino = fs::metadata(&lock).unwrap().ino();
    let mut cmd = mb();
    cmd.arg("lock").args(["--timeout", "2"]).arg(&control).arg("--").arg("touch").arg(&ran);
    let done = Run::of(cmd);
    let after = (fs::read_to_string(&lock).ok(), fs::metadata(&lock).map(|m| m.ino()).ok());
    let select_done_early = imap.poll_tagged(&tag, secs(0.1)).is_some();
    release();
    assert_eq!(comm.trim(), "imap", "the lock holder should be Dovecot's imap process");
    assert_eq!(content, format!("{dpid}:{}", host()), "Dovecot 2.4's lock format");
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());
    assert!(done.elapsed >= secs(1.9) && done.elapsed < secs(15.0), "{}", done.show());
    assert!(done.stderr.contains(&format!("pid {dpid}")), "message should name Dovecot's pid: {}", done.show());
    assert!(!ran.exists(), "our command ran while Dovecot held the lock");
    assert_eq!(after, (Some(content.clone()), Some(ino)), "Dovecot's lock was broken or replaced");
    assert!(!select_done_early, "SELECT finished while its process was paused?");

    let r = imap.poll_tagged(&tag, secs(10.0)).expect("SELECT did not complete after the hold");
    r.unwrap_or_else(|e| panic!("SELECT failed: {e}\n{}", d.log_tail()));
    assert!(wait_until(secs(5.0), || !lock.exists()), "Dovecot did not remove its lock");
    let mut cmd = mb();
    cmd.arg("lock").args(["--timeout", "5"]).arg(&control).arg("--").arg("touch").arg(&ran);
    let done = Run::of(cmd);
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(ran.exists());
    imap.logout();
    d.assert_clean_log();
    eprintln!("d24_lock_held_by_dovecot_times_out_75: {:.1?}", t0.elapsed());
}
