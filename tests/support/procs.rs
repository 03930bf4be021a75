//! Process helpers shared by the CLI tests (tests/lock.rs, tests/lock_dovecot.rs, tests/plugin.rs, ...):
//! run `maildir-backup` (or anything) as a child with a time limit and its output captured (a
//! [`Run`]), poll for a condition, the LD_PRELOAD shim that makes a real Dovecot imap process hold its own
//! uidlist lock, and [`LockHolder`] (our CLI holding a uidlist lock from outside).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::run::{cli_bin, Run, BIN};
use super::dovecot_common::children_of;

/// This host's name, as Dovecot and our CLI write it into `<pid>:<host>` lock files.
pub fn host() -> String {
    nix::unistd::gethostname().expect("gethostname").to_string_lossy().into_owned()
}

/// Short for `Duration::from_secs_f64`, so time limits read as numbers.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The CLI with an environment that cannot change its behaviour by accident (no inherited hostname
/// override, test seam, preload or lock-mode variables) and no stdin.
pub fn mb() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("DOVECOT_HOSTNAME")
        .env_remove("MAILDIR_BACKUP_TEST_LINK_LIES")
        .env_remove("LD_PRELOAD")
        .env_remove("DOTLOCK_USE_EXCL")
        .env_remove("MAIL_NFS_STORAGE")
        .stdin(Stdio::null());
    c
}

/// `maildir-backup lock OPTS DIR -- COMMAND...`, with the default action for the termination
/// signals whatever this test process was started with (a suite run as a background job ignores
/// SIGINT and SIGQUIT, and `lock` rightly leaves ignored signals alone).
pub fn lock_cmd<S: AsRef<std::ffi::OsStr>>(dir: &Path, opts: &[&str], command: &[S]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = mb();
    c.arg("lock").args(opts).arg(dir).arg("--").args(command);
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    c
}

/// A child started by [`spawn`]; its stdout and stderr go to temp files (not pipes, so a chatty child
/// never blocks and nothing has to drain it while the test does other things).
pub struct Running {
    /// Public so a test can poll it itself (`try_wait`) without consuming the `Running`.
    pub child: Child,
    out: File,
    err: File,
    started: Instant,
    what: String,
}

pub fn spawn(mut cmd: Command) -> Running {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    cmd.stdout(out.try_clone().unwrap()).stderr(err.try_clone().unwrap());
    let what = format!("{cmd:?}");
    let started = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    Running { child, out, err, started, what }
}

fn read_all(f: &mut File) -> String {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    s
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Waits for the child; past `limit` it is killed and the test panics (a hang is a failure).
    pub fn wait(mut self, limit: Duration) -> Run {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let elapsed = self.started.elapsed();
                return Run {
                    cmdline: self.what,
                    status,
                    stdout: read_all(&mut self.out),
                    stderr: read_all(&mut self.err),
                    elapsed,
                };
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} still running after {limit:?}; stderr: {}", self.what, read_all(&mut self.err));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `cmd` to completion within `limit` (see [`Running::wait`]).
pub fn run(cmd: Command, limit: Duration) -> Run {
    spawn(cmd).wait(limit)
}

/// Polls `cond` every 10 ms for up to `limit`; whether it became true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Names in `dir`, unsorted; empty if it cannot be read (e.g. does not exist yet).
pub fn files_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A real Dovecot process holding its own uidlist lock (tests/lock_dovecot.rs)

/// LD_PRELOAD shim for Dovecot's processes: once armed (a file `arm` in MB_HOLD_DIR), the first
/// process that completes a `dovecot-uidlist.lock` (Dovecot's own file_dotlock code: O_EXCL open +
/// write of `<pid>:<host>`, or link() of a written temp file) reports `held.<pid>` and pauses until
/// `release` exists. Inert unless armed.
pub const HOLD_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char suffix[] = "/dovecot-uidlist.lock";
static int lock_fd = -1;

static int is_uidlist_lock(const char *p)
{
	size_t n = p == NULL ? 0 : strlen(p), s = sizeof(suffix) - 1;
	return n >= s && strcmp(p + n - s, suffix) == 0;
}

static void *real(const char *name)
{
	void *f = dlsym(RTLD_NEXT, name);
	if (f == NULL)
		abort();
	return f;
}

/* The lock is complete (content written): pause if armed. */
static void hold(void)
{
	const char *dir = getenv("MB_HOLD_DIR");
	char arm[4096], rel[4096], held[4096];
	int saved = errno;

	if (dir == NULL)
		return;
	snprintf(arm, sizeof(arm), "%s/arm", dir);
	snprintf(rel, sizeof(rel), "%s/release", dir);
	snprintf(held, sizeof(held), "%s/held.%ld", dir, (long)getpid());
	if (unlink(arm) < 0) { /* not armed, or another process won */
		errno = saved;
		return;
	}
	int (*creat_real)(const char *, int, ...) = (int (*)(const char *, int, ...))real("open");
	int fd = creat_real(held, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (fd >= 0)
		close(fd);
	while (access(rel, F_OK) != 0) {
		struct timespec ts = { 0, 20 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	errno = saved;
}

static int after_open(const char *path, int flags, int fd)
{
	if (fd >= 0 && (flags & O_CREAT) && (flags & O_EXCL) && is_uidlist_lock(path))
		lock_fd = fd;
	return fd;
}

#define OPEN_WRAPPER(name)                                                    \
	int name(const char *path, int flags, ...)                            \
	{                                                                     \
		static int (*r)(const char *, int, ...);                      \
		mode_t mode = 0;                                              \
		if (flags & O_CREAT) {                                        \
			va_list ap;                                           \
			va_start(ap, flags);                                  \
			mode = va_arg(ap, int);                               \
			va_end(ap);                                           \
		}                                                             \
		if (r == NULL)                                                \
			r = (int (*)(const char *, int, ...))real(#name);     \
		return after_open(path, flags, r(path, flags, mode));         \
	}
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

ssize_t write(int fd, const void *buf, size_t n)
{
	static ssize_t (*r)(int, const void *, size_t);
	if (r == NULL)
		r = (ssize_t (*)(int, const void *, size_t))real("write");
	ssize_t ret = r(fd, buf, n);
	if (ret > 0 && fd == lock_fd) {
		lock_fd = -1;
		hold(); /* O_EXCL mode: the lock has its content now */
	}
	return ret;
}

int close(int fd)
{
	static int (*r)(int);
	if (r == NULL)
		r = (int (*)(int))real("close");
	if (fd == lock_fd)
		lock_fd = -1;
	return r(fd);
}

int link(const char *oldpath, const char *newpath)
{
	static int (*r)(const char *, const char *);
	if (r == NULL)
		r = (int (*)(const char *, const char *))real("link");
	int ret = r(oldpath, newpath);
	if (ret == 0 && is_uidlist_lock(newpath))
		hold(); /* link mode: the temp file was written before the link */
	return ret;
}

int linkat(int od, const char *oldpath, int nd, const char *newpath, int flags)
{
	static int (*r)(int, const char *, int, const char *, int);
	if (r == NULL)
		r = (int (*)(int, const char *, int, const char *, int))real("linkat");
	int ret = r(od, oldpath, nd, newpath, flags);
	if (ret == 0 && is_uidlist_lock(newpath))
		hold();
	return ret;
}
"#;

/// Compiles [`HOLD_SHIM`] into `dir/hold.so` and creates its control dir `dir/ctl` (writable by all:
/// imap runs as vmail). Returns `(so, ctl)`; pass both to Dovecot (LD_PRELOAD, MB_HOLD_DIR) through
/// its `import_environment`, whose syntax differs between 2.3 and 2.4.
pub fn build_hold_shim(dir: &Path) -> (PathBuf, PathBuf) {
    let so = dir.join("hold.so");
    let src = dir.join("hold.c");
    fs::write(&src, HOLD_SHIM).unwrap();
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("run cc");
    assert!(o.status.success(), "cc hold shim: {}", String::from_utf8_lossy(&o.stderr));
    fs::set_permissions(&so, fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = dir.join("ctl");
    fs::create_dir(&ctl).unwrap();
    fs::set_permissions(&ctl, fs::Permissions::from_mode(0o777)).unwrap();
    (so, ctl)
}

/// Like `pid=$(maildir-backup maildirlock DIR TIMEOUT)`: stdout is a pipe read to its end (which must
/// come as soon as the holder has the lock), stderr goes to `err`. The exit status and what was printed.
pub fn run_maildirlock(dir: &Path, timeout: &str, err: &Path) -> (ExitStatus, String) {
    let mut child = mb()
        .arg("maildirlock")
        .arg(dir)
        .arg(timeout)
        .stdout(Stdio::piped())
        .stderr(File::create(err).expect("create stderr file"))
        .spawn()
        .expect("run maildir-backup maildirlock");
    let mut stdout = String::new();
    child.stdout.take().expect("piped stdout").read_to_string(&mut stdout).expect("read maildirlock's stdout");
    (child.wait().expect("wait for maildirlock"), stdout)
}

// ---------------------------------------------------------------------------------------------
// Holding a uidlist lock from outside

/// `maildir-backup lock CONTROL_DIR -- sleep SECS` (our CLI, Dovecot's lock format). Stopped on drop.
pub struct LockHolder {
    child: Option<Child>,
    pub lock_path: PathBuf,
}

impl LockHolder {
    /// Starts the holder and waits until the lock file exists.
    pub fn start(control_dir: &Path, secs: u32) -> LockHolder {
        let lock_path = control_dir.join("dovecot-uidlist.lock");
        assert!(!lock_path.exists(), "{} already exists", lock_path.display());
        let child = Command::new(cli_bin())
            .arg("lock")
            .arg(control_dir)
            .arg("--")
            .args(["sleep", &secs.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("run maildir-backup lock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock_path.exists() {
            assert!(Instant::now() < deadline, "{} did not appear", lock_path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        LockHolder { child: Some(child), lock_path }
    }

    /// SIGTERM to the holder (it forwards it to `sleep` and releases the lock), then wait.
    pub fn release(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let Some(mut c) = self.child.take() else { return };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // `maildir-backup lock` forwards SIGTERM to its command, but (as of writing) starts the command
        // with SIGTERM blocked, so `sleep` ignores it until it ends by itself. End our own `sleep` (a
        // child of the holder we started) so the holder releases the lock now.
        let kids = children_of(c.id());
        eprintln!("note: `maildir-backup lock` did not end within 2 s of SIGTERM; SIGKILL to its command {kids:?}");
        for k in kids {
            let _ = kill(Pid::from_raw(k as i32), Signal::SIGKILL);
        }
        let _ = c.wait();
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        self.stop();
    }
}
