//! The `lock` and `maildirlock` commands on their own, without Dovecot.
//!
//! `maildir-backup lock` / `maildirlock` as real processes: Dovecot's lock format, exit codes, interop
//! with liblockfile's `dotlockfile`, stale-lock rules, release safety, refresh, the NFS lost-reply case
//! (a test seam and a real LD_PRELOAD shim), mutual exclusion under contention, and bad input.
//! No Dovecot needed (see tests/lock_dovecot.rs for that).

mod support;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::procs::{host, lock_cmd, mb, run, secs, spawn, wait_until, Running};

use support::{Run, BIN, EX_DATAERR, EX_NOINPUT, EX_NOPERM, EX_TEMPFAIL, EX_USAGE};

const LOCK: &str = "dovecot-uidlist.lock";
/// liblockfile's L_MAXTRYS: "Failed after max. number of attempts" (dotlockfile's exit code then).
const L_MAXTRYS: i32 = 4;

// ---------------------------------------------------------------------------------------------
// helpers

fn tmp() -> tempfile::TempDir {
    let t = tempfile::Builder::new().prefix("mb-lock.").tempdir().expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// `sh -c SCRIPT sh ARGS...` as an argv.
fn sh<S: AsRef<Path>>(script: &str, args: &[S]) -> Vec<String> {
    let mut v = vec!["sh".to_string(), "-c".to_string(), script.to_string(), "sh".to_string()];
    v.extend(args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()));
    v
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Sets atime and mtime to `ago` seconds in the past (utimensat; ctime becomes now, as always).
fn set_mtime_ago(path: &Path, ago: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(now_secs() - ago, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
    assert!(fs::symlink_metadata(path).unwrap().mtime() <= now_secs() - ago + 1);
}

/// A pid that just exited (its process has been reaped).
fn dead_pid() -> i32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    assert_eq!(kill(Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH));
    pid
}

/// Lock-post leftovers (Dovecot-style `.temp.<host>.<pid>.<rand>`).
fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("temp."))
        .collect()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn write_lock(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
}

fn assert_no_panic(d: &Run) {
    assert!(!d.stderr.contains("panicked"), "the CLI panicked:\n{}", d.show());
}

/// A command that signals it is inside (creates `inside`) and stays until `release` exists.
fn hold_until(inside: &Path, release: &Path) -> Vec<String> {
    sh(r#"touch "$1"; while [ ! -e "$2" ]; do sleep 0.05; done"#, &[inside, release])
}

// ---------------------------------------------------------------------------------------------
// 1. the command runs under a Dovecot-format lock; exit status is passed through

#[test]
fn command_runs_under_dovecot_format_lock_and_status_passes_through() {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let seen = out.path().join("seen");
    let listing = out.path().join("listing");

    let r = spawn(lock_cmd(
        d.path(),
        &[],
        &sh(r#"cat "$1" > "$2" && ls -a "$3" > "$4"; exit 3"#, &[&lock, &seen, d.path(), &listing]),
    ));
    let pid = r.pid();
    let done = r.wait(secs(20.0));
    assert_eq!(done.code(), Some(3), "{}", done.show());
    // Byte-exact Dovecot format: "<pid>:<hostname>", no newline; pid = the maildir-backup process.
    assert_eq!(fs::read_to_string(&seen).unwrap(), format!("{pid}:{}", host()));
    let names = fs::read_to_string(&listing).unwrap();
    assert!(names.lines().any(|l| l == LOCK), "lock missing while the command ran: {names}");
    assert!(!names.contains("temp."), "lock post left while the command ran: {names}");
    assert!(!lock.exists(), "lock not removed afterwards");
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));

    // Exit 0, and the lock is there (test -f) while it runs.
    let done = run(lock_cmd(d.path(), &[], &["test", "-f", lock.to_str().unwrap()]), secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(!lock.exists());

    // Killed by a signal: 128 + n, lock released.
    for (sig, code) in [("TERM", 128 + 15), ("KILL", 128 + 9)] {
        let done = run(lock_cmd(d.path(), &[], &sh(&format!("kill -{sig} $$"), &[] as &[&str])), secs(20.0));
        assert_eq!(done.code(), Some(code), "{}", done.show());
        assert!(!lock.exists(), "lock left after SIG{sig}");
    }

    // A command that cannot be run: 127 like a shell, lock released.
    let done = run(lock_cmd(d.path(), &[], &["/nonexistent/command"]), secs(20.0));
    assert_eq!(done.code(), Some(127), "{}", done.show());
    assert!(done.stderr.contains("/nonexistent/command"), "{}", done.show());
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));
}

#[test]
fn file_option_locks_path_dot_lock() {
    let d = tmp();
    let out = tmp();
    let mbox = d.path().join("mbox");
    fs::write(&mbox, "From x\n").unwrap();
    let seen = out.path().join("seen");
    let listing = out.path().join("listing");
    let mut c = mb();
    c.arg("lock")
        .arg("--file")
        .arg(&mbox)
        .arg("--")
        .args(sh(r#"cat "$1.lock" > "$2" && ls -a "$3" > "$4""#, &[&mbox, &seen, d.path(), &listing]));
    let r = spawn(c);
    let pid = r.pid();
    let done = r.wait(secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert_eq!(fs::read_to_string(&seen).unwrap(), format!("{pid}:{}", host()));
    let names = fs::read_to_string(&listing).unwrap();
    assert!(names.lines().any(|l| l == "mbox.lock"), "{names}");
    assert!(!names.contains(LOCK), "--file must not take the uidlist lock: {names}");
    assert_eq!(dir_names(d.path()), vec!["mbox".to_string()]);
    assert_eq!(fs::read_to_string(&mbox).unwrap(), "From x\n");
}

/// Started ignoring SIGINT (as a background job is), `lock` leaves it ignored: a SIGINT does not
/// end its wait for a busy lock (it times out as usual), while SIGTERM would.
#[test]
fn an_ignored_signal_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let d = tmp();
    // Held by a live process (pid 1 on this host): never stale.
    fs::write(d.path().join(LOCK), format!("1:{}", host())).unwrap();
    let waiting = |ignore_int: bool| {
        let mut c = lock_cmd(d.path(), &["--timeout", "2"], &["true"]);
        if ignore_int {
            // SAFETY: signal(2) is async-signal-safe.
            unsafe {
                c.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let r = spawn(c);
        thread::sleep(secs(0.5));
        kill(Pid::from_raw(r.pid()), Signal::SIGINT).unwrap();
        r.wait(secs(10.0))
    };
    let r = waiting(true);
    assert_eq!(r.code(), Some(EX_TEMPFAIL), "an ignored SIGINT ended the wait: {}", r.show());
    assert!(r.stderr.contains("timed out"), "{}", r.show());
    let r = waiting(false);
    assert_eq!(r.code(), Some(128 + 2), "SIGINT should end the wait: {}", r.show());
}

#[test]
fn termination_signals_are_forwarded_to_the_command_and_lock_released() {
    // The command must be killable by the signals `lock` forwards: a plain `sleep` (no shell that
    // might reset its signal mask) dies of SIGTERM/SIGINT/SIGHUP sent to `lock`, whose exit
    // status is then 128+n, with the lock released.
    let workers: Vec<_> = [(Signal::SIGTERM, 15), (Signal::SIGINT, 2), (Signal::SIGHUP, 1)]
        .into_iter()
        .map(|(sig, n)| {
            thread::spawn(move || {
                let d = tmp();
                let lock = d.path().join(LOCK);
                let r = spawn(lock_cmd(d.path(), &[], &["sleep", "30"]));
                assert!(wait_until(secs(10.0), || lock.exists()), "lock not taken");
                thread::sleep(secs(0.3)); // let it start the command
                kill(Pid::from_raw(r.pid()), sig).unwrap();
                let done = r.wait(secs(10.0));
                assert_eq!(done.code(), Some(128 + n), "{sig:?} to `lock -- sleep 30`: {}", done.show());
                assert!(done.elapsed < secs(5.0), "{sig:?} was not forwarded: {}", done.show());
                assert!(!lock.exists(), "lock left after {sig:?}");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }

    // A command that handles the signal: its own status is passed through.
    let d = tmp();
    let out = tmp();
    let inside = out.path().join("inside");
    let trapped = out.path().join("trapped");
    let r = spawn(lock_cmd(
        d.path(),
        &[],
        &sh(r#"trap 'echo term > "$2"; exit 5' TERM; touch "$1"; while :; do sleep 0.05; done"#, &[&inside, &trapped]),
    ));
    assert!(wait_until(secs(10.0), || inside.exists()), "command did not start");
    assert!(d.path().join(LOCK).exists());
    kill(Pid::from_raw(r.pid()), Signal::SIGTERM).unwrap();
    let done = r.wait(secs(10.0));
    assert_eq!(done.code(), Some(5), "the command's own status after it handled SIGTERM: {}", done.show());
    assert_eq!(fs::read_to_string(&trapped).unwrap().trim(), "term");
    assert!(!d.path().join(LOCK).exists(), "lock left after SIGTERM");
}

#[test]
fn sigterm_while_waiting_for_the_lock_ends_the_wait_and_runs_nothing() {
    let d = tmp();
    let out = tmp();
    let inside = out.path().join("inside");
    let release = out.path().join("release");
    let ran = out.path().join("ran");
    let holder = spawn(lock_cmd(d.path(), &[], &hold_until(&inside, &release)));
    assert!(wait_until(secs(10.0), || inside.exists()), "holder did not start");

    let waiter = spawn(lock_cmd(d.path(), &["--timeout", "20"], &["touch", ran.to_str().unwrap()]));
    thread::sleep(secs(0.7)); // it is waiting now
    let wpid = waiter.pid();
    kill(Pid::from_raw(wpid), Signal::SIGTERM).unwrap();
    let signalled = Instant::now();
    let mut waiter = waiter;
    let ended = wait_until(secs(2.0), || waiter.child.try_wait().unwrap().is_some());
    // Let the holder go either way: a waiter that ignored the signal gets the lock now.
    fs::write(&release, "").unwrap();
    let h = holder.wait(secs(10.0));
    assert_eq!(h.code(), Some(0), "{}", h.show());
    let w = waiter.wait(secs(30.0));
    assert!(
        ended,
        "SIGTERM did not end the wait within 2 s (exited {:.1?} after the signal, {}) : {}",
        signalled.elapsed(),
        if ran.exists() { "and then RAN the command" } else { "command not run" },
        w.show()
    );
    assert_ne!(w.code(), Some(0), "{}", w.show());
    assert!(!ran.exists(), "the command ran after SIGTERM: {}", w.show());
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));
}

// ---------------------------------------------------------------------------------------------
// 9. the lock is released as soon as the command ends (not after a refresh interval)

#[test]
fn release_is_prompt_after_the_command_exits() {
    // --stale-timeout 8 makes the refresh interval 2 s: a release that waits for the refresher's
    // next tick shows up as a run taking ~2 s instead of a few ms. The window is a race between
    // the refresher thread starting and the command ending, so try many quick commands, two at a
    // time (on different dirs) for some scheduling pressure.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(|| {
                let d = tmp();
                let mut worst = Duration::ZERO;
                for i in 0..150 {
                    let done = run(lock_cmd(d.path(), &["--stale-timeout", "8"], &["true"]), secs(30.0));
                    assert_eq!(done.code(), Some(0), "{}", done.show());
                    worst = worst.max(done.elapsed);
                    if done.elapsed > secs(1.5) {
                        return Err(format!(
                            "run {i}: `lock -- true` took {:.2?}: the lock was held ~one refresh interval \
                             after the command had exited",
                            done.elapsed
                        ));
                    }
                }
                Ok(worst)
            })
        })
        .collect();
    for w in workers {
        let worst = w.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        eprintln!("slowest `lock -- true`: {worst:.2?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. interop with liblockfile's dotlockfile

#[test]
fn dotlockfile_interop() {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let ran = out.path().join("ran");

    // dotlockfile holds it (-p: it writes the pid of its caller, this test, which is alive).
    let st = Command::new("dotlockfile").arg("-l").arg("-p").arg(&lock).status().expect("run dotlockfile");
    assert!(st.success(), "dotlockfile -l -p: {st:?}");
    let theirs = fs::read(&lock).unwrap();
    assert_eq!(theirs, format!("{}\n", std::process::id()).into_bytes(), "dotlockfile -p format");

    let done = run(lock_cmd(d.path(), &["--timeout", "1"], &["touch", ran.to_str().unwrap()]), secs(20.0));
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());
    assert!(done.elapsed >= secs(0.9), "gave up before the timeout: {}", done.show());
    assert!(done.stderr.contains(lock.to_str().unwrap()), "message should name the lock: {}", done.show());
    assert!(!ran.exists(), "command ran without the lock");
    assert_eq!(fs::read(&lock).unwrap(), theirs, "their lock was touched");
    assert!(temp_files(d.path()).is_empty(), "{:?}", temp_files(d.path()));

    let st = Command::new("dotlockfile").arg("-u").arg(&lock).status().unwrap();
    assert!(st.success());
    let done = run(lock_cmd(d.path(), &["--timeout", "1"], &["touch", ran.to_str().unwrap()]), secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(ran.exists());

    // We hold it: dotlockfile must fail (trying once), with and without its pid check.
    let inside = out.path().join("inside");
    let release = out.path().join("release");
    let holder = spawn(lock_cmd(d.path(), &[], &hold_until(&inside, &release)));
    assert!(wait_until(secs(10.0), || inside.exists()), "holder did not start");
    let ours = fs::read_to_string(&lock).unwrap();
    assert_eq!(ours, format!("{}:{}", holder.pid(), host()));
    for args in [&["-r", "0", "-l"][..], &["-p", "-r", "0", "-l"][..]] {
        let o = Command::new("dotlockfile").args(args).arg(&lock).output().unwrap();
        assert_eq!(o.status.code(), Some(L_MAXTRYS), "dotlockfile {args:?} while we hold the lock: {o:?}");
        assert_eq!(fs::read_to_string(&lock).unwrap(), ours, "dotlockfile {args:?} replaced our lock");
    }
    fs::write(&release, "").unwrap();
    let done = holder.wait(secs(10.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(done.stderr.is_empty(), "unexpected warnings: {}", done.show());
    assert!(!lock.exists());

    let o = Command::new("dotlockfile").args(["-r", "0", "-l"]).arg(&lock).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "dotlockfile after our release: {o:?}");
    assert!(lock.exists());
    assert!(Command::new("dotlockfile").arg("-u").arg(&lock).status().unwrap().success());
    assert!(!lock.exists());
}

// ---------------------------------------------------------------------------------------------
// 3. stale rules

#[test]
fn stale_lock_of_dead_local_pid_is_broken_at_once() {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let seen = out.path().join("seen");

    write_lock(&lock, &format!("{}:{}", dead_pid(), host()));
    set_mtime_ago(&lock, 5);
    let r = spawn(lock_cmd(d.path(), &["--timeout", "10"], &sh(r#"cat "$1" > "$2""#, &[&lock, &seen])));
    let pid = r.pid();
    let done = r.wait(secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(done.elapsed < secs(3.0), "dead-pid lock not broken at once: {}", done.show());
    assert_eq!(fs::read_to_string(&seen).unwrap(), format!("{pid}:{}", host()));
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));

    // A *fresh* lock of a dead pid is not judged by its pid during its first 2 s (its creator most
    // likely just made it), but it is broken once older than that.
    write_lock(&lock, &format!("{}:{}", dead_pid(), host()));
    let done = run(lock_cmd(d.path(), &["--timeout", "0.8"], &["true"]), secs(20.0));
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "young dead-pid lock: {}", done.show());
    let done = run(lock_cmd(d.path(), &["--timeout", "8"], &["true"]), secs(20.0));
    assert_eq!(done.code(), Some(0), "dead-pid lock older than 2 s: {}", done.show());
    assert!(!lock.exists());
}

#[test]
fn lock_of_live_local_pid_is_never_broken_by_age() {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let ran = out.path().join("ran");
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let content = format!("{}:{}", sleeper.id(), host());
    write_lock(&lock, &content);
    set_mtime_ago(&lock, 600);

    let done = run(
        lock_cmd(d.path(), &["--stale-timeout", "1", "--timeout", "3"], &["touch", ran.to_str().unwrap()]),
        secs(20.0),
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());
    assert!(done.elapsed >= secs(2.9), "{}", done.show());
    assert!(done.stderr.contains(&format!("pid {}", sleeper.id())), "message should name the holder: {}", done.show());
    assert!(!ran.exists());
    assert_eq!(fs::read_to_string(&lock).unwrap(), content);

    // Now that pid is dead: the same (old) lock is broken at once.
    let done = run(lock_cmd(d.path(), &["--timeout", "5"], &["touch", ran.to_str().unwrap()]), secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(done.elapsed < secs(3.0), "dead-pid lock not broken at once: {}", done.show());
    assert!(ran.exists());
}

#[test]
fn young_lock_of_live_local_pid_is_not_broken_by_a_short_stale_timeout() {
    // A lock younger than 2 s is not judged by its pid yet (Dovecot's rule: its creator most likely
    // just made it); that must not let the age rule break it when the stale timeout is shorter
    // than the wait. The holder is alive the whole time.
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let ran = out.path().join("ran");
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let content = format!("{}:{}", sleeper.id(), host());
    write_lock(&lock, &content);
    let done = run(
        lock_cmd(d.path(), &["--stale-timeout", "1", "--timeout", "3"], &["touch", ran.to_str().unwrap()]),
        secs(20.0),
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "live holder's young lock was broken: {}", done.show());
    assert!(!ran.exists());
    assert_eq!(fs::read_to_string(&lock).ok(), Some(content));
}

#[test]
fn lock_of_other_host_is_broken_only_by_age() {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let seen = out.path().join("seen");
    let content = "12345:some-other-host";
    write_lock(&lock, content);
    set_mtime_ago(&lock, 600);

    // stale timeout 0: never broken.
    let done = run(lock_cmd(d.path(), &["--stale-timeout", "0", "--timeout", "2"], &["true"]), secs(20.0));
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());
    assert!(done.stderr.contains("some-other-host"), "{}", done.show());
    assert_eq!(fs::read_to_string(&lock).unwrap(), content);

    // stale timeout 1: broken once unchanged for 1 s (the ctime utimes set counts as a change,
    // exactly as in Dovecot, so this takes ~1-2 s).
    let r = spawn(lock_cmd(
        d.path(),
        &["--stale-timeout", "1", "--timeout", "8"],
        &sh(r#"cat "$1" > "$2""#, &[&lock, &seen]),
    ));
    let pid = r.pid();
    let done = r.wait(secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert_eq!(fs::read_to_string(&seen).unwrap(), format!("{pid}:{}", host()));
    assert!(!lock.exists());
}

#[test]
fn garbage_and_empty_locks_are_judged_by_age_only() {
    let contents = ["", "garbage\n", "abc:def:ghi", "-5:x", "99999999999999999999:host", "\u{0}\u{1}\u{2}"];
    let workers: Vec<_> = contents
        .iter()
        .map(|content| {
            let content = content.to_string();
            thread::spawn(move || {
                let d = tmp();
                let lock = d.path().join(LOCK);
                write_lock(&lock, &content);
                set_mtime_ago(&lock, 600);
                let done = run(lock_cmd(d.path(), &["--stale-timeout", "0", "--timeout", "1"], &["true"]), secs(20.0));
                assert_no_panic(&done);
                assert_eq!(done.code(), Some(EX_TEMPFAIL), "content {content:?}: {}", done.show());
                assert_eq!(fs::read_to_string(&lock).unwrap(), content);
                let done = run(lock_cmd(d.path(), &["--stale-timeout", "1", "--timeout", "8"], &["true"]), secs(20.0));
                assert_no_panic(&done);
                assert_eq!(done.code(), Some(0), "content {content:?}: {}", done.show());
                assert!(!lock.exists());
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 4. release never removes a lock that is no longer ours

#[test]
fn release_leaves_a_replaced_lock_alone() {
    // Repeated: the dangerous case is the replacement getting the freed inode number of our lock
    // (ext4 hands it out again at once), which happens often but not every time.
    for (excl, _) in [false, true].iter().flat_map(|&e| (0..15).map(move |i| (e, i))) {
        let d = tmp();
        let lock = d.path().join(LOCK);
        let opts: &[&str] = if excl { &["--timeout", "1", "--excl-lock"] } else { &["--timeout", "1"] };
        let done = run(lock_cmd(d.path(), opts, &sh(r#"rm "$1"; echo 1:otherhost > "$1""#, &[&lock])), secs(20.0));
        assert_eq!(done.code(), Some(0), "excl={excl}: {}", done.show());
        assert_eq!(
            fs::read_to_string(&lock).ok().as_deref(),
            Some("1:otherhost\n"),
            "excl={excl}: our release removed someone else's lock: {}",
            done.show()
        );
        assert!(
            done.stderr.contains("overridden") && done.stderr.contains(lock.to_str().unwrap()),
            "excl={excl}: no 'overridden' warning: {}",
            done.show()
        );
    }

    // Deleted under us: a warning, nothing to remove.
    let d = tmp();
    let lock = d.path().join(LOCK);
    let done = run(lock_cmd(d.path(), &["--timeout", "1"], &["rm", lock.to_str().unwrap()]), secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(done.stderr.contains("deleted"), "no 'deleted' warning: {}", done.show());
    assert!(dir_names(d.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. refresh keeps a long-held lock from looking stale

#[test]
fn refresh_keeps_a_long_held_lock_from_being_broken_by_age() {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let inside = out.path().join("inside");
    let holder_ok = out.path().join("holder_ok");
    let contender_ran = out.path().join("contender_ran");
    let violation = out.path().join("violation");

    // Control: the same contender breaks an *unrefreshed* lock of host A within a few seconds, so
    // only the refresh can keep it waiting below.
    write_lock(&lock, "1:hostA");
    let mut c = lock_cmd(d.path(), &["--stale-timeout", "2", "--timeout", "8"], &["true"]);
    c.env("DOVECOT_HOSTNAME", "hostB");
    let done = run(c, secs(20.0));
    assert_eq!(done.code(), Some(0), "control: an unrefreshed lock should be broken: {}", done.show());
    assert!(!lock.exists());

    // Holder (host A) keeps the lock 4 s; it refreshes every 0.5 s (stale 2 / 4).
    let mut c = lock_cmd(
        d.path(),
        &["--stale-timeout", "2"],
        &sh(
            r#"touch "$1"; sleep 4
               if [ -e "$1" ] && [ ! -e "$3" ]; then echo ok > "$2"; fi
               rm "$1""#,
            &[&inside, &holder_ok, &contender_ran],
        ),
    );
    c.env("DOVECOT_HOSTNAME", "hostA");
    let holder = spawn(c);
    assert!(wait_until(secs(10.0), || inside.exists()), "holder did not start");
    let content = fs::read_to_string(&lock).unwrap();
    assert_eq!(content, format!("{}:hostA", holder.pid()));
    let mtime0 = fs::metadata(&lock).unwrap().mtime();

    // Contender (host B): for it the lock is foreign, so only its age matters.
    let mut c = lock_cmd(
        d.path(),
        &["--stale-timeout", "2", "--timeout", "6"],
        &sh(
            r#"if [ -e "$1" ]; then echo "contender inside while holder was" > "$3"; fi; touch "$2""#,
            &[&inside, &contender_ran, &violation],
        ),
    );
    c.env("DOVECOT_HOSTNAME", "hostB");
    let contender = spawn(c);

    thread::sleep(secs(2.5));
    let md = fs::metadata(&lock).expect("lock vanished while the holder held it");
    assert_eq!(fs::read_to_string(&lock).unwrap(), content, "lock was broken/replaced while held");
    assert!(md.mtime() > mtime0, "held lock's mtime did not advance in 2.5 s ({} -> {})", mtime0, md.mtime());
    assert!(!contender_ran.exists(), "contender got in while the holder held the lock");

    let h = holder.wait(secs(15.0));
    let c = contender.wait(secs(15.0));
    assert_eq!(h.code(), Some(0), "{}", h.show());
    assert_eq!(c.code(), Some(0), "contender should get the lock after the release: {}", c.show());
    assert!(h.stderr.is_empty(), "holder warned (its lock was taken away?): {}", h.show());
    assert!(holder_ok.exists(), "holder's critical section was interrupted");
    assert!(!violation.exists(), "{}", fs::read_to_string(&violation).unwrap_or_default());
    assert!(contender_ran.exists());
    assert!(c.elapsed >= secs(2.5), "contender did not wait for the holder: {}", c.show());
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));
}

// ---------------------------------------------------------------------------------------------
// 6. lost link() reply (NFS): the seam, a real LD_PRELOAD shim, and O_EXCL mode

/// Runs `lock` with `env` and checks: the command ran with our lock in place, no post file existed
/// while it ran or after, and the lock was released. Returns the lock process's pid.
fn check_lock_cycle(opts: &[&str], env: &[(&str, &Path)]) -> i32 {
    let d = tmp();
    let out = tmp();
    let lock = d.path().join(LOCK);
    let seen = out.path().join("seen");
    let listing = out.path().join("listing");
    let mut c =
        lock_cmd(d.path(), opts, &sh(r#"cat "$1" > "$2" && ls -a "$3" > "$4""#, &[&lock, &seen, d.path(), &listing]));
    for (k, v) in env {
        c.env(k, v);
    }
    let r = spawn(c);
    let pid = r.pid();
    let done = r.wait(secs(20.0));
    assert_eq!(done.code(), Some(0), "{}", done.show());
    assert!(done.stderr.is_empty(), "unexpected messages: {}", done.show());
    assert_eq!(fs::read_to_string(&seen).unwrap(), format!("{pid}:{}", host()));
    let names = fs::read_to_string(&listing).unwrap();
    assert!(names.lines().any(|l| l == LOCK), "{names}");
    assert!(!names.contains("temp."), "post file present while the lock was held: {names}");
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));

    // When link() really fails (someone else holds the lock), the lie must not make us think we
    // got it: wait, time out, leave their lock and no post behind.
    write_lock(&lock, "1:otherhost");
    let mut c = lock_cmd(d.path(), &[&["--timeout", "1"][..], opts].concat(), &["touch", seen.to_str().unwrap()]);
    for (k, v) in env {
        c.env(k, v);
    }
    fs::remove_file(&seen).unwrap();
    let done = run(c, secs(20.0));
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());
    assert!(!seen.exists());
    assert_eq!(fs::read_to_string(&lock).unwrap(), "1:otherhost");
    assert_eq!(dir_names(d.path()), vec![LOCK.to_string()]);
    pid
}

#[test]
fn lost_link_reply_via_test_seam() {
    check_lock_cycle(&[], &[("MAILDIR_BACKUP_TEST_LINK_LIES", Path::new("1"))]);
    check_lock_cycle(&["--nfs"], &[("MAILDIR_BACKUP_TEST_LINK_LIES", Path::new("1"))]);
}

fn link_lies_so() -> &'static Path {
    static SO: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SO.get_or_init(|| {
        let t = tmp();
        let so = t.path().join("link_lies.so");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/link_lies.c");
        let o = Command::new("cc")
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl")
            .output()
            .expect("run cc");
        assert!(o.status.success(), "cc {}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
        (t, so)
    })
    .1
}

#[test]
fn lost_link_reply_via_ld_preload_shim() {
    let so = link_lies_so();
    let logdir = tmp();
    let log = logdir.path().join("lies");
    let pid = check_lock_cycle(&[], &[("LD_PRELOAD", so), ("LINK_LIES_LOG", &log)]);
    // Prove the shim really lied to the lock process (and only about the lock).
    let lies = fs::read_to_string(&log).unwrap_or_default();
    let ours: Vec<&str> = lies.lines().filter(|l| l.starts_with(&format!("{pid} "))).collect();
    assert_eq!(ours.len(), 1, "expected exactly one lied-about link by pid {pid}: {lies:?}");
    assert!(ours[0].ends_with(LOCK), "{lies:?}");

    // O_EXCL mode does not link at all.
    fs::remove_file(&log).ok();
    check_lock_cycle(&["--excl-lock"], &[("LD_PRELOAD", so), ("LINK_LIES_LOG", &log)]);
    assert!(!log.exists(), "--excl-lock used link(): {:?}", fs::read_to_string(&log));
}

#[test]
fn excl_lock_mode_excludes_and_is_excluded_by_link_mode() {
    check_lock_cycle(&["--excl-lock"], &[]);
    for (holder_opts, contender_opts) in [(&["--excl-lock"][..], &[][..]), (&[][..], &["--excl-lock"][..])] {
        let d = tmp();
        let out = tmp();
        let inside = out.path().join("inside");
        let release = out.path().join("release");
        let ran = out.path().join("ran");
        let holder = spawn(lock_cmd(d.path(), holder_opts, &hold_until(&inside, &release)));
        assert!(wait_until(secs(10.0), || inside.exists()), "holder did not start");
        let done = run(
            lock_cmd(d.path(), &[&["--timeout", "1"][..], contender_opts].concat(), &["touch", ran.to_str().unwrap()]),
            secs(20.0),
        );
        assert_eq!(
            done.code(),
            Some(EX_TEMPFAIL),
            "holder {holder_opts:?} contender {contender_opts:?}: {}",
            done.show()
        );
        assert!(!ran.exists());
        fs::write(&release, "").unwrap();
        let h = holder.wait(secs(10.0));
        assert_eq!(h.code(), Some(0), "{}", h.show());
        let done = run(
            lock_cmd(d.path(), &[&["--timeout", "1"][..], contender_opts].concat(), &["touch", ran.to_str().unwrap()]),
            secs(20.0),
        );
        assert_eq!(done.code(), Some(0), "{}", done.show());
        assert!(ran.exists());
        assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));
    }
}

// ---------------------------------------------------------------------------------------------
// 7. mutual exclusion under contention

/// The critical section: enter with O_EXCL on a marker (`set -C`), check the lock file names our
/// parent (the maildir-backup holding it), stay a moment, check nobody else came in, leave.
/// Builtins only apart from `sleep`, to keep the serial part short. Any violation is appended to
/// OUT/violations. Args: DIR OUT WORKER ITER HOST
const CRITICAL: &str = r#"
m="$2/marker"; me="$3.$4"
if ! (set -C; echo "$me" > "$m") 2>/dev/null; then
    echo "$me: entered while someone else was inside" >> "$2/violations"; exit 1
fi
l=; read -r l < "$1/dovecot-uidlist.lock"   # no newline in the lock: read fails but sets l
[ "$l" = "$PPID:$5" ] || echo "$me: lock says '$l', expected '$PPID:$5'" >> "$2/violations"
echo "$me" >> "$2/log"
sleep 0.001
x=; read -r x < "$m"
[ "$x" = "$me" ] || echo "$me: marker changed to '$x' while inside" >> "$2/violations"
rm "$m"
"#;

#[test]
fn contention_mutual_exclusion() {
    const WORKERS: usize = 8;
    const ITERS: usize = 250;
    let d = tmp();
    let out = tmp();
    let crit = out.path().join("crit.sh");
    fs::write(&crit, CRITICAL).unwrap();
    let started = Instant::now();
    let workers: Vec<Running> = (0..WORKERS)
        .map(|w| {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(
                    r#"i=0
                    while [ $i -lt "$5" ]; do
                        i=$((i+1))
                        "$1" lock "$2" --timeout 60 -- sh "$6" "$2" "$3" "$4" $i "$7" ||
                            echo "$4.$i: lock exited $?" >> "$3/violations"
                    done"#,
                )
                .arg("sh")
                .arg(BIN)
                .arg(d.path())
                .arg(out.path())
                .arg(w.to_string())
                .arg(ITERS.to_string())
                .arg(&crit)
                .arg(host())
                .env_remove("DOVECOT_HOSTNAME")
                .env_remove("MAILDIR_BACKUP_TEST_LINK_LIES")
                .env_remove("LD_PRELOAD")
                .stdin(Stdio::null());
            spawn(c)
        })
        .collect();
    // All must finish within the deadline; on failure stop the remaining workers too.
    let deadline = started + secs(150.0);
    let mut pending = workers;
    let mut finished = Vec::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for mut w in pending {
            if w.child.try_wait().unwrap().is_some() {
                finished.push(w.wait(secs(1.0)));
            } else {
                still.push(w);
            }
        }
        pending = still;
        if !pending.is_empty() && Instant::now() > deadline {
            for w in &mut pending {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
            let log = fs::read_to_string(out.path().join("log")).unwrap_or_default();
            panic!(
                "contention: only {} of {} critical sections done after {:.0?} (slow lock hand-over?)",
                log.lines().count(),
                WORKERS * ITERS,
                started.elapsed()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    for done in &finished {
        assert_eq!(done.code(), Some(0), "{}", done.show());
        stderr.push_str(&done.stderr);
    }
    let violations = fs::read_to_string(out.path().join("violations")).unwrap_or_default();
    assert!(violations.is_empty(), "mutual exclusion violated:\n{violations}\nstderr:\n{stderr}");
    assert!(stderr.is_empty(), "unexpected messages:\n{stderr}");
    let log = fs::read_to_string(out.path().join("log")).unwrap();
    let mut entries: Vec<&str> = log.lines().collect();
    entries.sort();
    entries.dedup();
    assert_eq!(entries.len(), WORKERS * ITERS, "critical sections run");
    assert_eq!(log.lines().count(), WORKERS * ITERS);
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));
    eprintln!(
        "contention: {} acquisitions by {WORKERS} processes in {elapsed:.1?} ({:.1} ms each)",
        WORKERS * ITERS,
        elapsed.as_secs_f64() * 1000.0 / (WORKERS * ITERS) as f64
    );
}

// ---------------------------------------------------------------------------------------------
// 8. bad input

#[test]
fn missing_dir_is_ex_noinput() {
    let d = tmp();
    let missing = d.path().join("no/such/dir");
    let done = run(lock_cmd(&missing, &[], &["true"]), secs(20.0));
    assert_eq!(done.code(), Some(EX_NOINPUT), "{}", done.show());
    assert!(done.stderr.contains(missing.to_str().unwrap()), "{}", done.show());

    let file = d.path().join("file");
    fs::write(&file, "").unwrap();
    let done = run(lock_cmd(&file, &[], &["true"]), secs(20.0));
    assert_eq!(done.code(), Some(EX_NOINPUT), "a file as mailbox dir: {}", done.show());
    assert!(done.stderr.contains(file.to_str().unwrap()), "{}", done.show());

    let mut c = mb();
    c.arg("lock").arg("--file").arg(d.path().join("nodir/mbox")).args(["--", "true"]);
    let done = run(c, secs(20.0));
    assert_eq!(done.code(), Some(EX_NOINPUT), "{}", done.show());
    assert!(done.stderr.contains("nodir"), "{}", done.show());
}

#[test]
fn unwritable_dir_is_ex_noperm() {
    let d = tmp();
    let ro = d.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
    let as_root = nix::unistd::geteuid().is_root();
    for opts in [&[][..], &["--excl-lock"][..]] {
        let mut c = if as_root {
            // root may write anywhere: run as nobody.
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", BIN]);
            c
        } else {
            Command::new(BIN)
        };
        c.arg("lock").args(opts).arg(&ro).args(["--", "true"]).env_remove("DOVECOT_HOSTNAME").stdin(Stdio::null());
        let done = run(c, secs(20.0));
        assert_eq!(done.code(), Some(EX_NOPERM), "{opts:?}: {}", done.show());
        assert!(done.stderr.contains(ro.to_str().unwrap()), "message should name the dir: {}", done.show());
        assert!(done.stderr.contains("ermission denied"), "{}", done.show());
        assert!(dir_names(&ro).is_empty());
    }
}

#[test]
fn lock_path_that_is_a_directory_or_symlink_is_refused_and_left_alone() {
    for opts in [&[][..], &["--excl-lock"][..]] {
        // A directory.
        let d = tmp();
        let lock = d.path().join(LOCK);
        fs::create_dir(&lock).unwrap();
        fs::write(lock.join("keep"), "x").unwrap();
        let done = run(
            lock_cmd(d.path(), &[&["--timeout", "1", "--stale-timeout", "1"][..], opts].concat(), &["true"]),
            secs(20.0),
        );
        assert_eq!(done.code(), Some(EX_DATAERR), "{opts:?}: {}", done.show());
        assert!(done.stderr.contains(lock.to_str().unwrap()) && done.stderr.contains("directory"), "{}", done.show());
        assert!(lock.join("keep").exists());
        assert_eq!(dir_names(d.path()), vec![LOCK.to_string()], "post left behind");

        // A symlink to a file elsewhere, even an old one: the target stays untouched.
        let d = tmp();
        let elsewhere = tmp();
        let target = elsewhere.path().join("precious");
        fs::write(&target, "precious data").unwrap();
        set_mtime_ago(&target, 1000);
        let before = fs::metadata(&target).unwrap();
        let lock = d.path().join(LOCK);
        symlink(&target, &lock).unwrap();
        set_mtime_ago(&lock, 1000);
        let done = run(
            lock_cmd(d.path(), &[&["--timeout", "1", "--stale-timeout", "1"][..], opts].concat(), &["true"]),
            secs(20.0),
        );
        assert_eq!(done.code(), Some(EX_DATAERR), "{opts:?}: {}", done.show());
        assert!(done.stderr.contains(lock.to_str().unwrap()) && done.stderr.contains("symlink"), "{}", done.show());
        let after = fs::metadata(&target).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious data");
        assert_eq!((after.ino(), after.mtime(), after.size()), (before.ino(), before.mtime(), before.size()));
        assert_eq!(fs::read_link(&lock).unwrap(), target, "symlink removed or changed");
        assert_eq!(dir_names(d.path()), vec![LOCK.to_string()], "post left behind");

        // A dangling symlink: its target must not be created.
        let d = tmp();
        let target = elsewhere.path().join("not-there");
        symlink(&target, d.path().join(LOCK)).unwrap();
        let done = run(lock_cmd(d.path(), &[&["--timeout", "1"][..], opts].concat(), &["true"]), secs(20.0));
        assert_eq!(done.code(), Some(EX_DATAERR), "{opts:?}: {}", done.show());
        assert!(!target.exists(), "created a file through a symlinked lock");
        assert_eq!(dir_names(d.path()), vec![LOCK.to_string()]);
    }
}

#[test]
fn usage_errors_are_ex_usage_and_run_nothing() {
    let d = tmp();
    let out = tmp();
    let ran = out.path().join("ran");
    let ran_s = ran.to_str().unwrap();
    let dir = d.path().to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["lock", "--bogus", dir, "--", "touch", ran_s],
        vec!["lock", dir],
        vec!["lock", dir, "--"],
        vec!["lock", "--", "touch", ran_s],
        vec!["lock", "--timeout", "soon", dir, "--", "touch", ran_s],
        vec!["lock", "--timeout", "-1", dir, "--", "touch", ran_s],
        vec!["lock", "--file", "/tmp/x", dir, "--", "touch", ran_s],
        vec!["no-such-subcommand"],
        vec![],
    ];
    for args in cases {
        let mut c = mb();
        c.args(&args);
        let done = run(c, secs(20.0));
        assert_eq!(done.code(), Some(EX_USAGE), "{args:?}: {}", done.show());
        assert!(!done.stderr.is_empty(), "{args:?}: no message");
        assert!(!ran.exists(), "{args:?} ran the command");
        assert!(dir_names(d.path()).is_empty(), "{args:?} left {:?}", dir_names(d.path()));
    }
}

#[test]
fn huge_durations_neither_crash_nor_break_locks() {
    let d = tmp();
    let lock = d.path().join(LOCK);
    // Not representable: a usage error, not a panic.
    for t in ["1e20", "inf", "nan"] {
        let done = run(lock_cmd(d.path(), &["--timeout", t], &["true"]), secs(20.0));
        assert_no_panic(&done);
        assert_eq!(done.code(), Some(EX_USAGE), "--timeout {t}: {}", done.show());
    }
    // Representable but beyond any clock: "wait for ever" (the lock is free, so it just runs).
    let done = run(lock_cmd(d.path(), &["--timeout", "1e19"], &["true"]), secs(20.0));
    assert_no_panic(&done);
    assert_eq!(done.code(), Some(0), "{}", done.show());
    // A huge stale timeout means "practically never", so an old foreign lock stays.
    write_lock(&lock, "1:otherhost");
    set_mtime_ago(&lock, 600);
    for st in ["1e19", "1e15"] {
        let done = run(lock_cmd(d.path(), &["--stale-timeout", st, "--timeout", "1"], &["true"]), secs(20.0));
        assert_no_panic(&done);
        assert_eq!(done.code(), Some(EX_TEMPFAIL), "--stale-timeout {st}: {}", done.show());
        assert_eq!(fs::read_to_string(&lock).unwrap(), "1:otherhost", "--stale-timeout {st} broke the lock");
    }
}

// ---------------------------------------------------------------------------------------------
// maildirlock: drop-in for Dovecot's /usr/lib/dovecot/maildirlock

#[test]
fn maildirlock_contract() {
    let d = tmp();
    let lock = d.path().join(LOCK);
    let errs = tmp();

    // Like `pid=$(maildirlock DIR 5)`: stdout is a pipe read to EOF, which must come promptly.
    let started = Instant::now();
    let mut child = mb()
        .arg("maildirlock")
        .arg(d.path())
        .arg("5")
        .stdout(Stdio::piped())
        .stderr(File::create(errs.path().join("1")).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let status = child.wait().unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}, stderr: {}", fs::read_to_string(errs.path().join("1")).unwrap());
    assert!(took < secs(3.0), "$(maildirlock) took {took:?}");
    assert!(!stdout.ends_with('\n') && !stdout.is_empty(), "stdout {stdout:?}");
    let pid: i32 = stdout.parse().unwrap_or_else(|_| panic!("not a pid: {stdout:?}"));
    assert_ne!(pid, child.id() as i32, "printed its own pid, not the holder's");
    assert!(kill(Pid::from_raw(pid), None).is_ok(), "holder {pid} is not running");
    assert_eq!(fs::read_to_string(&lock).unwrap(), format!("{pid}:{}", host()));

    // A second one times out with 1 and prints nothing.
    let done = run(
        {
            let mut c = mb();
            c.arg("maildirlock").arg(d.path()).arg("1");
            c
        },
        secs(20.0),
    );
    assert_eq!(done.code(), Some(1), "{}", done.show());
    assert!(done.stdout.is_empty(), "{}", done.show());
    assert!(done.elapsed >= secs(0.9), "{}", done.show());
    assert_eq!(fs::read_to_string(&lock).unwrap(), format!("{pid}:{}", host()));

    // `lock` respects it too.
    let done = run(lock_cmd(d.path(), &["--timeout", "1"], &["true"]), secs(20.0));
    assert_eq!(done.code(), Some(EX_TEMPFAIL), "{}", done.show());

    // SIGTERM releases it.
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert!(wait_until(secs(5.0), || !lock.exists()), "lock not removed after SIGTERM to {pid}");
    assert!(dir_names(d.path()).is_empty(), "leftovers: {:?}", dir_names(d.path()));
    let errors = fs::read_to_string(errs.path().join("1")).unwrap();
    assert!(errors.is_empty(), "holder said: {errors}");

    // Failures: exit 1, nothing on stdout.
    for args in [vec![d.path().join("missing").into_os_string(), "1".into()], vec![d.path().into(), "x".into()]] {
        let done = run(
            {
                let mut c = mb();
                c.arg("maildirlock").args(&args);
                c
            },
            secs(20.0),
        );
        assert_eq!(done.code(), Some(1), "{args:?}: {}", done.show());
        assert!(done.stdout.is_empty(), "{}", done.show());
        assert!(!done.stderr.is_empty(), "{}", done.show());
    }
}
