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
use maildir_backup::sysexits::{self, ExitCode};
use nix::sys::signal::{SigSet, Signal};

use super::parse_secs;


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

#[derive(Args, Debug, Clone, Copy)]
pub struct LockModeArgs {
    /// Create the lock with O_EXCL instead of link() (Dovecot's dotlock_use_excl = yes).
    #[arg(long)]
    pub excl_lock: bool,
    /// The Maildir is on NFS: flush attribute caches before judging locks (mail_nfs_storage = yes).
    #[arg(long)]
    pub nfs: bool,
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
fn open_dir(dir: &Path, what: &str) -> Result<Arc<Dir>, (i32, String)> {
    match Dir::open(dir) {
        Ok(d) => Ok(Arc::new(d)),
        Err(e) if e.errno() == Some(libc::ENOTDIR) => Err((sysexits::EX_NOINPUT, format!("{what} {} is not a directory", dir.display()))),
        Err(e) => Err((e.exit_code(), format!("{what}: {e}"))),
    }
}

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        set.add(s);
    }
    set
}

pub fn run_lock(a: LockArgs) -> i32 {
    let target = match (&a.file, &a.mailbox_dir) {
        (Some(file), _) => {
            let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let name = file.file_name().and_then(|n| n.to_str()).map(str::to_string);
            open_dir(parent, "directory of").and_then(|d| {
                let name = name.ok_or((sysexits::EX_USAGE, format!("--file {}: no usable file name", file.display())))?;
                Ok((d, name, dotlock::GENERIC_STALE_TIMEOUT))
            })
        }
        (None, Some(dir)) => open_dir(dir, "mailbox dir").map(|d| (d, UIDLIST.to_string(), dotlock::UIDLIST_STALE_TIMEOUT)),
        (None, None) => unreachable!("clap requires MAILBOX_DIR or --file"),
    };
    let (dir, protected, default_stale) = match target {
        Ok(t) => t,
        Err((code, msg)) => {
            eprintln!("maildir-backup lock: {msg}");
            return code;
        }
    };
    let set = LockSettings {
        timeout: a.timeout,
        stale_timeout: a.stale_timeout.unwrap_or(default_stale),
        use_excl: a.mode.excl_lock,
        nfs_flush: a.mode.nfs,
    };

    // Block the termination signals before any thread exists, so they reach our sigwait
    // thread only (the command gets them unblocked again in pre_exec below).
    let sigs = signals();
    if let Err(e) = sigs.thread_block() {
        eprintln!("maildir-backup lock: pthread_sigmask: {e}");
        return sysexits::EX_SOFTWARE;
    }

    // One thread takes the termination signals for the whole run: while we wait for the lock
    // they end the wait (nothing runs); once the command runs they are forwarded to it.
    std::thread::spawn(move || loop {
        if let Ok(sig) = sigs.wait() {
            SIGNALLED.store(sig as i32, Ordering::SeqCst);
            let pid = CHILD.load(Ordering::SeqCst);
            if pid > 0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
    });

    let lock = match acquire_interruptible(&dir, &protected, &set) {
        Ok(Some(l)) => l,
        Ok(None) => {
            let sig = SIGNALLED.load(Ordering::SeqCst);
            eprintln!("maildir-backup lock: interrupted by signal {sig} while waiting for the lock");
            return 128 + sig;
        }
        Err(e) => {
            eprintln!("maildir-backup lock: {e}");
            return e.exit_code();
        }
    };
    if SIGNALLED.load(Ordering::SeqCst) != 0 {
        // Signalled just as we got it: run nothing.
        let sig = SIGNALLED.load(Ordering::SeqCst);
        release_and_warn(lock);
        return 128 + sig;
    }
    let refresher = lock.keep_fresh(refresh_interval(set.stale_timeout));

    let mut command = Command::new(&a.command[0]);
    command.args(&a.command[1..]);
    // std::process does not reset the signal mask: without this the command would start with
    // SIGINT/SIGTERM/SIGHUP/SIGQUIT blocked and ignore the signals we forward to it.
    // SAFETY: pthread_sigmask is async-signal-safe.
    unsafe {
        command.pre_exec(move || sigs.thread_unblock().map_err(std::io::Error::from));
    }
    let code = match command.spawn() {
        Err(e) => {
            eprintln!("maildir-backup lock: run {}: {e}", a.command[0]);
            if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 }
        }
        Ok(mut child) => {
            CHILD.store(child.id() as i32, Ordering::SeqCst);
            // A signal that came between the check above and now was not forwarded yet.
            let sig = SIGNALLED.load(Ordering::SeqCst);
            if sig != 0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::try_from(sig).unwrap_or(Signal::SIGTERM));
            }
            match child.wait() {
                Ok(status) => exit_status_code(status),
                Err(e) => {
                    eprintln!("maildir-backup lock: wait for {}: {e}", a.command[0]);
                    sysexits::EX_SOFTWARE
                }
            }
        }
    };
    drop(refresher);
    release_and_warn(lock);
    code
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
    match lock.release() {
        Ok(outcome) => {
            if let Some(w) = dotlock::release_warning(&path, outcome, held) {
                eprintln!("maildir-backup: {w}");
            }
        }
        Err(e) => eprintln!("maildir-backup: {e}"),
    }
}

pub fn run_maildirlock(a: MaildirlockArgs) -> i32 {
    let Ok(timeout) = a.timeout.parse::<u32>() else {
        eprintln!("maildirlock: Invalid timeout value: {}", a.timeout);
        return 1;
    };
    let set = LockSettings {
        timeout: Duration::from_secs(timeout.into()),
        stale_timeout: dotlock::UIDLIST_STALE_TIMEOUT,
        use_excl: std::env::var_os("DOTLOCK_USE_EXCL").is_some(),
        nfs_flush: std::env::var_os("MAIL_NFS_STORAGE").is_some(),
    };
    let (mut rd, wr) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("maildirlock: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: no threads exist yet in this process (clap parsing spawns none).
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("maildirlock: fork: {e}");
            1
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(wr);
            let mut byte = [0u8; 1];
            match rd.read(&mut byte) {
                Ok(1) => {
                    print!("{child}");
                    let _ = std::io::stdout().flush();
                    0
                }
                _ => 1, // the holder could not lock (it said why on stderr)
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            // Our stdout must not keep `$(maildirlock ...)` waiting: point it at stderr.
            let _ = nix::unistd::dup2(std::io::stderr().as_raw_fd(), std::io::stdout().as_raw_fd());
            let sigs = signals();
            if sigs.thread_block().is_err() {
                return 1;
            }
            let lock = match DotLock::acquire(&a.dir.join(UIDLIST), &set) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("maildirlock: {e}");
                    return 1;
                }
            };
            let mut wr = wr;
            if wr.write_all(b"\0").is_err() {
                return 1;
            }
            drop(wr);
            let refresher = lock.keep_fresh(refresh_interval(set.stale_timeout));
            loop {
                match sigs.wait() {
                    Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => break,
                    _ => {}
                }
            }
            drop(refresher);
            release_and_warn(lock);
            0
        }
    }
}
