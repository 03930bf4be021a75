//! `lock` (hold a dot-lock around a command) and `maildirlock` (drop-in for Dovecot's tool).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use maildir_backup::dotlock::{self, DotLock, LockSettings};
use maildir_backup::fsx::Dir;
use maildir_backup::maildir::UIDLIST;
use maildir_backup::sysexits;
use maildir_backup::warnings::{self, Sink};
use nix::sys::signal::{SigSet, Signal};

use super::args::{parse_secs, LockModeArgs};
use super::{Failure, Outcome, Stderr};

/// Hold a Maildir's dovecot-uidlist.lock (or PATH.lock) while COMMAND runs.
#[derive(Args, Debug)]
pub struct LockArgs {
    /// The mailbox's control dir (the Maildir folder itself unless CONTROL= is set).
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    mailbox_dir: Option<PathBuf>,
    /// Lock PATH.lock instead (a generic dot-lock, e.g. for an mbox).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Seconds to wait for the lock.
    #[arg(long, default_value = "122", value_parser = parse_secs, value_name = "SECS")]
    timeout: Duration,
    /// Break a lock that nobody changed for SECS (0 = never) [default: 120, 300 with --file].
    #[arg(long, value_parser = parse_secs, value_name = "SECS")]
    stale_timeout: Option<Duration>,
    #[command(flatten)]
    mode: LockModeArgs,
    /// The command to run while the lock is held.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Drop-in for Dovecot's maildirlock: prints the holder's pid and exits 0 once locked (1 on
/// timeout); the holder keeps the lock until it gets SIGTERM or SIGINT.
#[derive(Args, Debug)]
pub struct MaildirlockArgs {
    /// The mailbox's control dir.
    dir: PathBuf,
    /// Seconds to wait for the lock.
    timeout: String,
}

/// How often to touch a held lock: Dovecot's 10 s, or faster if the stale timeout is short.
pub fn refresh_interval(stale: Duration) -> Duration {
    if stale.is_zero() {
        return dotlock::TOUCH_INTERVAL;
    }
    (stale / 4).clamp(Duration::from_millis(500), dotlock::TOUCH_INTERVAL)
}

/// The directory to lock in, opened (symlinks only where the admin alone could have made them).
fn open_dir(dir: &Path, what: &str) -> Result<Arc<Dir>, Failure> {
    match Dir::open(dir) {
        Ok(d) => Ok(Arc::new(d)),
        Err(e) if e.errno() == Some(libc::ENOTDIR) => Err(Failure::new(sysexits::EX_NOINPUT, format!("{what} {} is not a directory", dir.display()))),
        Err(e) => Err(Failure::new(e.exit_code(), format!("{what}: {e}"))),
    }
}

/// The termination signals we take (and forward to the command): those we were not started
/// ignoring. A command started from a background job ignores SIGINT and SIGQUIT, and so does
/// its command; forwarding them to it would leave it running while we wait for it.
fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        if !ignored(s) {
            set.add(s);
        }
    }
    set
}

fn ignored(sig: Signal) -> bool {
    // SAFETY: a query only (no new action); `old` is plain data the kernel fills in.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig as libc::c_int, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

impl LockArgs {
    /// The directory to lock in, the file the lock protects there, and its lock settings.
    fn target(&self) -> Result<(Arc<Dir>, String, LockSettings), Failure> {
        let (dir, protected, default_stale) = match (&self.file, &self.mailbox_dir) {
            (Some(file), _) => {
                let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let dir = open_dir(parent, "directory of")?;
                let name = file.file_name().and_then(|n| n.to_str()).ok_or_else(|| Failure::usage(format!("--file {}: no usable file name", file.display())))?;
                (dir, name.to_string(), dotlock::GENERIC_STALE_TIMEOUT)
            }
            (None, Some(dir)) => (open_dir(dir, "mailbox dir")?, UIDLIST.to_string(), dotlock::UIDLIST_STALE_TIMEOUT),
            (None, None) => unreachable!("clap requires MAILBOX_DIR or --file"),
        };
        let set = LockSettings {
            timeout: self.timeout,
            stale_timeout: self.stale_timeout.unwrap_or(default_stale),
            use_excl: self.mode.excl_lock,
            nfs_flush: self.mode.nfs,
        };
        Ok((dir, protected, set))
    }
}

pub fn run_lock(a: LockArgs) -> Outcome {
    let (dir, protected, set) = a.target()?;
    // Block the termination signals before any thread exists, so they reach our sigwait
    // thread only (the command gets them unblocked again in run_command).
    let sigs = signals();
    sigs.thread_block().map_err(|e| Failure::new(sysexits::EX_SOFTWARE, format!("pthread_sigmask: {e}")))?;
    take_signals(sigs);

    let lock = match acquire_interruptible(&dir, &protected, &set)? {
        Some(l) => l,
        None => {
            let sig = SIGNALLED.load(Ordering::SeqCst);
            return Err(Failure::new(128 + sig, format!("interrupted by signal {sig} while waiting for the lock")));
        }
    };
    let sig = SIGNALLED.load(Ordering::SeqCst);
    if sig != 0 {
        // Signalled just as we got it: run nothing.
        release_and_warn(lock);
        return Ok(128 + sig);
    }
    let refresher = lock.keep_fresh(refresh_interval(set.stale_timeout));
    let code = run_command(&a.command, sigs);
    drop(refresher);
    release_and_warn(lock);
    code
}

/// One thread takes the termination signals for the whole run: while we wait for the lock
/// they end the wait (nothing runs); once the command runs they are forwarded to it.
fn take_signals(sigs: SigSet) {
    std::thread::spawn(move || loop {
        if let Ok(sig) = sigs.wait() {
            SIGNALLED.store(sig as i32, Ordering::SeqCst);
            let pid = CHILD.load(Ordering::SeqCst);
            if pid > 0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
    });
}

/// Runs `argv` with the termination signals unblocked; its exit code (126/127 as a shell
/// gives if it cannot be run, 128 + signal if a signal ended it).
fn run_command(argv: &[String], sigs: SigSet) -> Outcome {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    // std::process does not reset the signal mask: without this the command would start with
    // SIGINT/SIGTERM/SIGHUP/SIGQUIT blocked and ignore the signals we forward to it.
    // SAFETY: pthread_sigmask is async-signal-safe.
    unsafe {
        command.pre_exec(move || sigs.thread_unblock().map_err(std::io::Error::from));
    }
    let mut child = command.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        Failure::new(code, format!("run {}: {e}", argv[0]))
    })?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // A signal that came between the check before the spawn and now was not forwarded yet.
    let sig = SIGNALLED.load(Ordering::SeqCst);
    if sig != 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::try_from(sig).unwrap_or(Signal::SIGTERM));
    }
    let status = child.wait().map_err(|e| Failure::new(sysexits::EX_SOFTWARE, format!("wait for {}: {e}", argv[0])))?;
    Ok(exit_status_code(status))
}

/// A termination signal received (0: none) and the running command's pid (0: none yet).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);
static CHILD: AtomicI32 = AtomicI32::new(0);

/// DotLock::acquire in short slices, so that a termination signal ends the wait promptly.
/// Ok(None) if a signal came first.
fn acquire_interruptible(dir: &Arc<Dir>, file: &str, set: &LockSettings) -> Result<Option<DotLock>, dotlock::LockError> {
    let start = std::time::Instant::now();
    loop {
        if SIGNALLED.load(Ordering::SeqCst) != 0 {
            return Ok(None);
        }
        let left = set.timeout.saturating_sub(start.elapsed());
        let slice = LockSettings { timeout: left.min(Duration::from_millis(250)), ..set.clone() };
        match DotLock::acquire_in(dir, file, &slice) {
            Ok(l) => return Ok(Some(l)),
            Err(dotlock::LockError::Timeout { path, holder, .. }) => {
                if start.elapsed() >= set.timeout {
                    return Err(dotlock::LockError::Timeout { path, holder, waited: start.elapsed() });
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn exit_status_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn release_and_warn(lock: DotLock) {
    let held = lock.held_for();
    let path = lock.lock_path();
    let sink = Stderr("maildir-backup: ");
    match lock.release() {
        Ok(outcome) => {
            if let Some(w) = dotlock::release_warning(&path, outcome, held) {
                sink.warn(&w);
            }
        }
        Err(e) => sink.warn(&e.to_string()),
    }
    warnings::emit_deferred(&sink);
}

pub fn run_maildirlock(a: MaildirlockArgs) -> Outcome {
    let failed = |what: &str| Failure::new(1, what.to_string());
    let timeout = a.timeout.parse::<u32>().map_err(|_| failed(&format!("Invalid timeout value: {}", a.timeout)))?;
    let set = LockSettings {
        timeout: Duration::from_secs(timeout.into()),
        stale_timeout: dotlock::UIDLIST_STALE_TIMEOUT,
        use_excl: std::env::var_os("DOTLOCK_USE_EXCL").is_some(),
        nfs_flush: std::env::var_os("MAIL_NFS_STORAGE").is_some(),
    };
    let (mut rd, wr) = std::io::pipe().map_err(|e| failed(&format!("pipe: {e}")))?;
    // SAFETY: no threads exist yet in this process (clap parsing spawns none).
    match unsafe { nix::unistd::fork() }.map_err(|e| failed(&format!("fork: {e}")))? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut byte = [0u8; 1];
            match rd.read(&mut byte) {
                Ok(1) => {
                    print!("{child}");
                    let _ = std::io::stdout().flush();
                    Ok(0)
                }
                _ => Ok(1), // the holder could not lock (it said why on stderr)
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            hold_for_maildirlock(&a.dir, &set, wr)
        }
    }
}

/// The holder `maildirlock` forks: locks, tells its parent through `ready`, and keeps the
/// lock until SIGTERM or SIGINT.
fn hold_for_maildirlock(dir: &Path, set: &LockSettings, mut ready: std::io::PipeWriter) -> Outcome {
    // Our stdout must not keep `$(maildirlock ...)` waiting: point it at stderr.
    let _ = nix::unistd::dup2(std::io::stderr().as_raw_fd(), std::io::stdout().as_raw_fd());
    let sigs = signals();
    if sigs.thread_block().is_err() {
        return Ok(1);
    }
    let lock = match DotLock::acquire(&dir.join(UIDLIST), set) {
        Ok(l) => l,
        Err(e) => {
            // Said here, while `ready` is open: the parent exits the moment it closes, and
            // whoever ran `maildirlock` reads stderr then.
            eprintln!("maildirlock: {e}");
            return Ok(1);
        }
    };
    if ready.write_all(b"\0").is_err() {
        return Ok(1);
    }
    drop(ready);
    let refresher = lock.keep_fresh(refresh_interval(set.stale_timeout));
    loop {
        match sigs.wait() {
            Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => break,
            _ => {}
        }
    }
    drop(refresher);
    release_and_warn(lock);
    Ok(0)
}
