//! Dovecot-compatible, NFS-safe dot-locks (`<file>.lock`).
//!
//! The algorithm follows Dovecot's `file_dotlock` so that Dovecot honours our locks and we
//! honour Dovecot's, and Exim/liblockfile's "hitching post" for NFS:
//! * link mode (default): write `<pid>:<host>` into a unique post file created with
//!   `O_CREAT|O_EXCL`, `link()` it to the lock name, and if `link()` reports any failure,
//!   trust the post's link count (2 = the link was made, only the reply was lost);
//! * O_EXCL mode: create the lock itself with `O_CREAT|O_EXCL` (Dovecot's `dotlock_use_excl`);
//! * stale locks: a lock naming a dead pid on this host (older than 2 s) is broken at once;
//!   otherwise only when neither the lock nor the protected file changed for the stale
//!   timeout. A lock naming a live local pid, or a lock this process holds, is never broken.
//! * release only removes the lock if its dev/ino are still ours.
//!
//! Everything happens in the open directory of the protected file (see `fsx`): a lock
//! directory someone swaps for a symlink, or a lock name someone swaps for a FIFO, is never
//! followed or read.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::fsx::{Dir, FsError, Meta};
use crate::sysexits::{self, ExitCode};

/// Dovecot's default stale timeout for `dovecot-uidlist.lock` (MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT).
pub const UIDLIST_STALE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default stale timeout for generic lock files (`--file`), as for mbox dotlocks.
pub const GENERIC_STALE_TIMEOUT: Duration = Duration::from_secs(300);
/// Dovecot touches a held uidlist lock this often (MAILDIR_LOCK_TOUCH_SECS).
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(10);
/// Younger locks are not judged by their pid: the holder most likely just created them.
const STALE_PID_CHECK_SECS: i64 = 2;
/// Longest sleep between two checks while waiting.
const MAX_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum LockError {
    #[error("timed out after {waited:.1?} waiting for lock {path} (held by {holder})")]
    Timeout { path: PathBuf, waited: Duration, holder: String },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error("lock path {path} is {kind}, not a lock file; refusing to use or remove it")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl LockError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        LockError::Io { op, path: path.to_path_buf(), source }
    }
}

impl ExitCode for LockError {
    fn exit_code(&self) -> i32 {
        match self {
            LockError::Timeout { .. } => sysexits::EX_TEMPFAIL,
            LockError::Io { source, .. } => sysexits::for_io_error(source),
            LockError::NotAFile { .. } => sysexits::EX_DATAERR,
            LockError::Fs(e) => e.exit_code(),
        }
    }
}

/// How to take a lock. The defaults are Dovecot's for `dovecot-uidlist`.
#[derive(Debug, Clone)]
pub struct LockSettings {
    /// How long to wait for the lock; zero means try once.
    pub timeout: Duration,
    /// Break a lock nobody changed for this long; zero means never break by age.
    pub stale_timeout: Duration,
    /// Create the lock with O_EXCL instead of link() (Dovecot's `dotlock_use_excl`).
    pub use_excl: bool,
    /// Flush NFS attribute caches before judging a lock (Dovecot's `mail_nfs_storage`).
    pub nfs_flush: bool,
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings {
            timeout: Duration::from_secs(122),
            stale_timeout: UIDLIST_STALE_TIMEOUT,
            use_excl: false,
            nfs_flush: false,
        }
    }
}

/// What release found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released,
    /// Someone deleted our lock while we held it.
    Deleted,
    /// Someone replaced our lock with their own; it was left alone.
    Overridden,
}

/// The host name Dovecot writes into its locks (honours `DOVECOT_HOSTNAME` like Dovecot).
pub fn my_hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        if let Ok(h) = std::env::var("DOVECOT_HOSTNAME") {
            if !h.is_empty() {
                return h;
            }
        }
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".to_string())
    })
}

/// The content of a lock made by this process: `<pid>:<hostname>`, no newline (Dovecot's format).
pub fn lock_content() -> String {
    format!("{}:{}", std::process::id(), my_hostname())
}

/// Locks this process holds, by (dev, ino): a lock naming our own pid is ours to keep, not
/// stale, as long as it is in here (Dovecot, single-threaded, would break it).
fn held_by_us() -> &'static Mutex<HashSet<(u64, u64)>> {
    static HELD: OnceLock<Mutex<HashSet<(u64, u64)>>> = OnceLock::new();
    HELD.get_or_init(|| Mutex::new(HashSet::new()))
}

fn registry_insert(id: (u64, u64)) {
    held_by_us().lock().unwrap_or_else(|p| p.into_inner()).insert(id);
}
fn registry_remove(id: (u64, u64)) {
    held_by_us().lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
}
fn registry_contains(id: (u64, u64)) -> bool {
    held_by_us().lock().unwrap_or_else(|p| p.into_inner()).contains(&id)
}

/// Identity and change stamp of a file, as Dovecot compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: i64,
    mtime: i64,
}

impl Stamp {
    fn of(md: &Meta) -> Stamp {
        Stamp { dev: md.dev(), ino: md.ino(), size: md.size(), ctime: md.ctime(), mtime: md.mtime() }
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Who holds a lock, parsed from its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub host: String,
}

impl Holder {
    /// Parses `<pid>:<host>` (a trailing newline is allowed); None for anything else.
    pub fn parse(content: &[u8]) -> Option<Holder> {
        let text = std::str::from_utf8(content).ok()?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let (pid, host) = text.split_once(':')?;
        let pid: i32 = pid.parse().ok()?;
        if pid <= 0 || host.is_empty() {
            return None;
        }
        Some(Holder { pid, host: host.to_string() })
    }

    fn is_local(&self) -> bool {
        self.host == my_hostname()
    }
}

/// A lock file's name in its directory, and its full path for messages.
#[derive(Debug, Clone)]
pub struct LockFile {
    pub dir: Arc<Dir>,
    pub name: String,
}

impl LockFile {
    pub fn path(&self) -> PathBuf {
        self.dir.show(&self.name)
    }
}

fn read_lock_content(lock: &LockFile) -> Option<Vec<u8>> {
    // Regular files only, never through a symlink, never blocking on a planted FIFO.
    let f = lock.dir.open_read(&lock.name).ok()?;
    let mut buf = Vec::with_capacity(64);
    Read::by_ref(&mut &f.file).take(512).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// A readable description of a lock's holder, for messages.
pub fn describe_holder(lock: &LockFile) -> String {
    match read_lock_content(lock) {
        None => "nobody (lock vanished)".to_string(),
        Some(c) => match Holder::parse(&c) {
            Some(h) => format!("pid {} on host {}", h.pid, h.host),
            None if c.is_empty() => "an empty lock file".to_string(),
            None => format!("unrecognised content {:?}", String::from_utf8_lossy(&c[..c.len().min(64)])),
        },
    }
}

/// A process exists (or we may not signal it, which also means it exists).
fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

/// NFS clients cache attributes; a no-op chown forces the client to revalidate them
/// (what Dovecot does on Linux), and opening the directory anew revalidates its entries
/// (close-to-open consistency). Errors are irrelevant: this only refreshes a cache.
fn nfs_flush_attr_cache(dir: &Dir, name: &str) {
    dir.nfs_flush(name);
    let _ = dir.try_clone();
}

fn lstat_lock(lock: &LockFile) -> Result<Option<Meta>, LockError> {
    match lock.dir.lstat(&lock.name)? {
        Some(md) if md.is_file() => Ok(Some(md)),
        Some(md) => {
            let kind = match md.kind() {
                crate::fsx::Kind::Dir => "a directory",
                crate::fsx::Kind::Symlink => "a symlink",
                _ => "a special file",
            };
            Err(LockError::NotAFile { path: lock.path(), kind })
        }
        None => Ok(None),
    }
}

/// What a waiter knows about someone else's lock (Dovecot's `lock_info`).
struct Judge<'a> {
    set: &'a LockSettings,
    /// The protected file's name in the lock's directory.
    file: &'a str,
    lock: &'a LockFile,
    lock_seen: Option<Stamp>,
    file_seen: Option<Stamp>,
    last_change: i64,
    pid_read: bool,
    holder_pid: Option<i32>,
    stated_once: bool,
}

enum Verdict {
    /// No lock file: try to create one.
    Free,
    /// Someone holds it; wait.
    Held,
}

impl<'a> Judge<'a> {
    fn new(set: &'a LockSettings, file: &'a str, lock: &'a LockFile) -> Self {
        Judge {
            set,
            file,
            lock,
            lock_seen: None,
            file_seen: None,
            last_change: 0,
            pid_read: false,
            holder_pid: None,
            stated_once: false,
        }
    }

    /// Records a file's stamp; true if it changed since last seen. The first sighting counts
    /// as a change at the file's own mtime/ctime, so an old untouched lock is stale at once.
    fn note_change(seen: &mut Option<Stamp>, last_change: &mut i64, md: &Meta, now: i64, check_ctime: bool) -> bool {
        let st = Stamp::of(md);
        let changed = match seen {
            None => true,
            Some(old) => {
                old.dev != st.dev
                    || old.ino != st.ino
                    || old.size != st.size
                    || old.mtime != st.mtime
                    || (check_ctime && old.ctime != st.ctime)
            }
        };
        if changed {
            let when = if seen.is_none() {
                if st.mtime <= now && (st.mtime > st.ctime || !check_ctime) { st.mtime } else { st.ctime }
            } else {
                now
            };
            if *last_change < when {
                *last_change = when;
            }
            *seen = Some(st);
        }
        changed
    }

    /// lstat the lock; None if it is gone. Also tells whether it changed.
    fn observe_lock(&mut self, now: i64) -> Result<Option<bool>, LockError> {
        if self.set.nfs_flush && self.stated_once {
            nfs_flush_attr_cache(&self.lock.dir, &self.lock.name);
        }
        self.stated_once = true;
        match lstat_lock(self.lock)? {
            None => Ok(None),
            Some(md) => Ok(Some(Self::note_change(&mut self.lock_seen, &mut self.last_change, &md, now, !self.set.nfs_flush))),
        }
    }

    fn read_local_pid(&self) -> Option<i32> {
        let content = read_lock_content(self.lock)?;
        let holder = Holder::parse(&content)?;
        holder.is_local().then_some(holder.pid)
    }

    fn check(&mut self, now: i64) -> Result<Verdict, LockError> {
        let changed = match self.observe_lock(now)? {
            None => return Ok(Verdict::Free),
            Some(c) => c,
        };
        if changed || !self.pid_read {
            let mtime = self.lock_seen.map(|s| s.mtime).unwrap_or(now);
            if mtime >= now - STALE_PID_CHECK_SECS {
                // Just created: its holder is most likely alive; do not judge the pid yet.
                self.pid_read = false;
                self.holder_pid = None;
            } else {
                self.holder_pid = self.read_local_pid();
                self.pid_read = true;
            }
        } else if self.holder_pid.is_some() {
            // Re-read: a rapidly recreated lock may keep its times but name a new pid.
            self.holder_pid = self.read_local_pid();
        }

        if let Some(pid) = self.holder_pid {
            let ours = pid == std::process::id() as i32;
            if ours {
                if let Some(st) = self.lock_seen {
                    if registry_contains((st.dev, st.ino)) {
                        return Ok(Verdict::Held); // held by another thread of ours: never break it
                    }
                }
            } else if pid_alive(pid) {
                return Ok(Verdict::Held);
            }
            // The holder is dead: break it unless it was just replaced.
            let before = self.lock_seen;
            match self.observe_lock(now)? {
                None => return Ok(Verdict::Free),
                Some(true) => return Ok(Verdict::Held),
                Some(false) => {
                    return self.break_lock(before);
                }
            }
        }

        if self.set.stale_timeout.is_zero() {
            return Ok(Verdict::Held);
        }
        // Saturating: a huge stale timeout means "practically never", not a negative one.
        let stale = i64::try_from(self.set.stale_timeout.as_secs()).unwrap_or(i64::MAX);
        if now > self.last_change.saturating_add(stale) {
            // Looks stale; the protected file changing also counts as the holder being alive.
            if self.set.nfs_flush {
                nfs_flush_attr_cache(&self.lock.dir, self.file);
            }
            if let Some(md) = self.lock.dir.lstat(self.file)? {
                Self::note_change(&mut self.file_seen, &mut self.last_change, &md, now, !self.set.nfs_flush);
            }
        }
        if now > self.last_change.saturating_add(stale) {
            // Before breaking by age, look at the pid even of a lock too young to have been judged
            // by it above: a live local holder is never overridden, however short the stale
            // timeout (Dovecot's are >= 120 s and never meet this case; --stale-timeout can be 1).
            if let Some(pid) = self.read_local_pid() {
                let ours = pid == std::process::id() as i32;
                let held_here = ours && self.lock_seen.is_some_and(|st| registry_contains((st.dev, st.ino)));
                if held_here || (!ours && pid_alive(pid)) {
                    return Ok(Verdict::Held);
                }
            }
            let seen = self.lock_seen;
            return self.break_lock(seen);
        }
        Ok(Verdict::Held)
    }

    /// Removes a stale lock, but only the one we judged (same dev/ino).
    fn break_lock(&mut self, judged: Option<Stamp>) -> Result<Verdict, LockError> {
        if let (Some(judged), Some(md)) = (judged, lstat_lock(self.lock)?) {
            if md.dev() != judged.dev || md.ino() != judged.ino {
                return Ok(Verdict::Held);
            }
        }
        self.lock.dir.unlink(&self.lock.name)?;
        // Another breaker that judged the same stale lock may unlink right after us; give it
        // time to do so before we create ours (Dovecot sleeps the same 0.1-0.2 s).
        thread::sleep(random_pause());
        self.lock_seen = None;
        self.pid_read = false;
        self.holder_pid = None;
        Ok(Verdict::Free)
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Never fatal: uniqueness also comes from host and pid in the name.
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        return t ^ ((std::process::id() as u64) << 32);
    }
    u64::from_ne_bytes(b)
}

fn random_pause() -> Duration {
    Duration::from_micros(100_000 + random_u64() % 100_000)
}

/// The unique "hitching post" we link to the lock name.
struct Post<'a> {
    dir: &'a Dir,
    name: String,
    file: File,
}

impl<'a> Post<'a> {
    fn create(dir: &'a Dir, nfs_flush: bool) -> Result<Post<'a>, LockError> {
        let name = format!(".temp.{}.{}.{:016x}", my_hostname().replace('/', "_"), std::process::id(), random_u64());
        let mut file = dir.create(&name, 0o666)?;
        let post = Post { dir, file: file.try_clone().map_err(|e| LockError::io("dup", &dir.show(&name), e))?, name };
        write_content(&mut file, &dir.show(&post.name), nfs_flush)?;
        Ok(post)
    }
}

impl Drop for Post<'_> {
    fn drop(&mut self) {
        let _ = self.dir.unlink(&self.name);
    }
}

fn write_content(file: &mut File, path: &Path, nfs_flush: bool) -> Result<(), LockError> {
    file.write_all(lock_content().as_bytes()).map_err(|e| LockError::io("write", path, e))?;
    if nfs_flush {
        file.sync_data().map_err(|e| LockError::io("fdatasync", path, e))?;
    }
    Ok(())
}

/// Test seam: `MAILDIR_BACKUP_TEST_LINK_LIES=1` makes a successful link() report failure,
/// the lost-reply case NFS produces, so tests can show it is handled.
fn link_lies() -> bool {
    static LIES: OnceLock<bool> = OnceLock::new();
    *LIES.get_or_init(|| std::env::var_os("MAILDIR_BACKUP_TEST_LINK_LIES").is_some())
}

/// One attempt to create the lock. Ok(Some(file)) = created, Ok(None) = someone has it.
fn try_create<'a>(lock: &'a LockFile, set: &LockSettings, post: &mut Option<Post<'a>>) -> Result<Option<File>, LockError> {
    if set.use_excl {
        return match lock.dir.create(&lock.name, 0o666) {
            Ok(mut f) => {
                write_content(&mut f, &lock.path(), set.nfs_flush)?;
                Ok(Some(f))
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(None),
            Err(e) => Err(e.into()),
        };
    }

    if post.is_none() {
        *post = Some(Post::create(&lock.dir, set.nfs_flush)?);
    }
    let p = post.as_ref().expect("post was just created");
    let mut result = lock.dir.link(&p.name, &lock.dir, &lock.name);
    if result.is_ok() && link_lies() {
        result = Err(FsError::Io { op: "link", path: lock.path(), source: io::Error::from_raw_os_error(libc::EIO) });
    }
    if let Err(e) = result {
        // Whatever link() said, the post's link count tells the truth.
        let nlink = p.file.metadata().map_err(|e2| LockError::io("fstat lock post", &lock.dir.show(&p.name), e2))?;
        if std::os::unix::fs::MetadataExt::nlink(&nlink) != 2 {
            return if e.errno() == Some(libc::EEXIST) { Ok(None) } else { Err(e.into()) };
        }
    }
    let taken = post.take().expect("post exists");
    let file = taken.file.try_clone().map_err(|e| LockError::io("dup", &lock.path(), e))?;
    drop(taken); // unlinks the post; the lock keeps the inode
    Ok(Some(file))
}

/// A held dot-lock. Dropping it releases it (with a deferred warning if it was overridden).
#[derive(Debug)]
pub struct DotLock {
    lock: LockFile,
    dev: u64,
    ino: u64,
    locked_at: Instant,
    released: bool,
}

impl DotLock {
    /// Locks the file `path` by creating `path.lock`, waiting up to `set.timeout`. `path` is
    /// an admin's path: its directory is opened as `Dir::open` does.
    pub fn acquire(path: &Path, set: &LockSettings) -> Result<DotLock, LockError> {
        let (dir, name) = split_path(path)?;
        DotLock::acquire_in(&Arc::new(dir), &name, set)
    }

    /// Locks `file` in the open directory `dir` by creating `<file>.lock` there.
    pub fn acquire_in(dir: &Arc<Dir>, file: &str, set: &LockSettings) -> Result<DotLock, LockError> {
        let lock = LockFile { dir: dir.clone(), name: format!("{file}.lock") };
        let start = Instant::now();
        // None: a timeout too large to represent means waiting for ever.
        let deadline = start.checked_add(set.timeout);
        let mut judge = Judge::new(set, file, &lock);
        let mut post: Option<Post> = None;
        let mut wait = Duration::ZERO;
        let mut prev_change = 0i64;
        let mut first = true;
        loop {
            if !first {
                // Back off while nothing changes; start over when the lock changes hands.
                if prev_change != judge.last_change || wait.is_zero() {
                    wait = random_pause();
                    prev_change = judge.last_change;
                } else if wait < MAX_WAIT {
                    wait = (wait + wait / 2).min(MAX_WAIT);
                }
                let left = deadline.map_or(wait, |d| d.saturating_duration_since(Instant::now()));
                wait_for_change(&lock, wait.min(left));
            }
            first = false;
            if let Verdict::Free = judge.check(now_secs())? {
                if let Some(file) = try_create(&lock, set, &mut post)? {
                    drop(post);
                    return DotLock::adopt(lock, file);
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(LockError::Timeout { holder: describe_holder(&lock), path: lock.path(), waited: start.elapsed() });
            }
        }
    }

    fn adopt(lock: LockFile, file: File) -> Result<DotLock, LockError> {
        let md = file.metadata().map_err(|e| LockError::io("fstat", &lock.path(), e))?;
        drop(file);
        let (dev, ino) = (std::os::unix::fs::MetadataExt::dev(&md), std::os::unix::fs::MetadataExt::ino(&md));
        // Make sure the name still points at what we created (Dovecot's sanity check).
        match lstat_lock(&lock)? {
            Some(now) if now.dev() == dev && now.ino() == ino => {}
            _ => {
                return Err(LockError::io(
                    "verify new lock",
                    &lock.path(),
                    io::Error::other("lock was replaced right after we created it"),
                ))
            }
        }
        registry_insert((dev, ino));
        Ok(DotLock { lock, dev, ino, locked_at: Instant::now(), released: false })
    }

    pub fn lock_path(&self) -> PathBuf {
        self.lock.path()
    }
    pub fn held_for(&self) -> Duration {
        self.locked_at.elapsed()
    }

    /// Keeps the lock fresh from a background thread until the returned guard is dropped.
    pub fn keep_fresh(&self, every: Duration) -> Refresher {
        Refresher::start(vec![(self.lock.clone(), self.dev, self.ino)], every)
    }

    /// Releases the lock; never removes a lock that is no longer ours.
    pub fn release(mut self) -> Result<ReleaseOutcome, LockError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<ReleaseOutcome, LockError> {
        self.released = true;
        registry_remove((self.dev, self.ino));
        match lstat_lock(&self.lock) {
            Ok(None) => Ok(ReleaseOutcome::Deleted),
            Ok(Some(md)) if !still_ours(&self.lock, &md, self.dev, self.ino) => Ok(ReleaseOutcome::Overridden),
            Ok(Some(_)) => match self.lock.dir.unlink(&self.lock.name)? {
                true => Ok(ReleaseOutcome::Released),
                false => Ok(ReleaseOutcome::Deleted),
            },
            Err(LockError::NotAFile { .. }) => Ok(ReleaseOutcome::Overridden),
            Err(e) => Err(e),
        }
    }

    /// True if the lock's directory was removed while we held the lock (its folder deleted).
    pub fn dir_removed(&self) -> bool {
        self.lock.dir.is_removed()
    }
}

/// The open directory of an admin's path, and the file name in it.
pub fn split_path(path: &Path) -> Result<(Dir, String), LockError> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        LockError::io("lock", path, io::Error::new(io::ErrorKind::InvalidInput, "no usable file name"))
    })?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((Dir::open(parent)?, name.to_string()))
}

/// The warning a mail admin should see when a held lock was taken away.
pub fn release_warning(lock_path: &Path, outcome: ReleaseOutcome, held: Duration) -> Option<String> {
    match outcome {
        ReleaseOutcome::Released => None,
        ReleaseOutcome::Deleted => Some(format!(
            "warning: our lock {} was deleted by someone else while we held it ({:.1?}); the copy may not be consistent",
            lock_path.display(),
            held
        )),
        ReleaseOutcome::Overridden => Some(format!(
            "warning: our lock {} was overridden by someone else while we held it ({:.1?}); left their lock in place",
            lock_path.display(),
            held
        )),
    }
}

impl Drop for DotLock {
    fn drop(&mut self) {
        if !self.released {
            let held = self.held_for();
            match self.release_inner() {
                Ok(outcome) => {
                    if let Some(w) = release_warning(&self.lock.path(), outcome, held) {
                        crate::warnings::defer(w);
                    }
                }
                Err(e) => crate::warnings::defer(format!("warning: releasing lock: {e}")),
            }
        }
    }
}

/// Is the lock file (lstat'ed as `md`) still the one we created? Equal dev/ino alone is not
/// proof: once our lock is unlinked its inode number is free, and a lock someone creates right
/// after may get the very same number (ext4 reuses them at once). Its content must also still be
/// ours (`<our pid>:<our host>`, which nobody else writes).
fn still_ours(lock: &LockFile, md: &Meta, dev: u64, ino: u64) -> bool {
    md.dev() == dev && md.ino() == ino && read_lock_content(lock).is_some_and(|c| c == lock_content().as_bytes())
}

fn touch_if_ours(lock: &LockFile, dev: u64, ino: u64) -> Result<bool, LockError> {
    match lstat_lock(lock)? {
        Some(md) if still_ours(lock, &md, dev, ino) => {
            lock.dir.touch(&lock.name)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Background toucher of held locks (one thread for any number of them).
pub struct Refresher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    targets: Arc<Mutex<Vec<(LockFile, u64, u64)>>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Keeps all of `locks` fresh from one background thread until the guard is dropped.
pub fn keep_all_fresh(locks: &[DotLock], every: Duration) -> Refresher {
    Refresher::start(locks.iter().map(|l| (l.lock.clone(), l.dev, l.ino)).collect(), every)
}

impl Refresher {
    fn start(targets: Vec<(LockFile, u64, u64)>, every: Duration) -> Refresher {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let targets = Arc::new(Mutex::new(targets));
        let shared = targets.clone();
        let thread = thread::spawn(move || {
            let (lock, cv) = &*flag;
            let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
            // Check the flag before every wait: a stop that came before this thread first
            // took the mutex must not be slept through.
            while !*stopped {
                let (guard, _) = cv.wait_timeout(stopped, every).unwrap_or_else(|p| p.into_inner());
                stopped = guard;
                if *stopped {
                    return;
                }
                shared.lock().unwrap_or_else(|p| p.into_inner()).retain(|(lock, dev, ino)| match touch_if_ours(lock, *dev, *ino) {
                    Ok(true) => true,
                    Ok(false) => {
                        crate::warnings::defer(format!("warning: lock {} is no longer ours; stopped refreshing it", lock.path().display()));
                        false
                    }
                    Err(e) => {
                        crate::warnings::defer(format!("warning: refreshing lock: {e}"));
                        true
                    }
                });
            }
        });
        Refresher { stop, targets, thread: Some(thread) }
    }

    /// Stops refreshing at once, without waiting for the thread to end (which, on a busy CPU,
    /// can take a while): it touches only while holding the flag's mutex, so no touch follows.
    pub fn stop_now(mut self) {
        self.halt();
        self.thread.take(); // detached: it ends on its own
    }

    fn halt(&self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Keeps `lock` fresh too.
    pub fn add(&self, lock: &DotLock) {
        self.targets.lock().unwrap_or_else(|p| p.into_inner()).push((lock.lock.clone(), lock.dev, lock.ino));
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.halt();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sleeps up to `max`, waking early when the lock file is removed, renamed or touched (where
/// inotify works; else it polls).
fn wait_for_change(lock: &LockFile, max: Duration) {
    if max.is_zero() {
        return;
    }
    if wait_inotify(lock, max) {
        return;
    }
    thread::sleep(max);
}

/// True if inotify could be used (whether or not an event came).
fn wait_inotify(lock: &LockFile, max: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;

    let Ok(ino) = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) else { return false };
    let flags = AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DONT_FOLLOW;
    // Through /proc/self/fd: the very directory we opened, whatever its path names now.
    match ino.add_watch(&lock.dir.proc_path().join(&lock.name), flags) {
        Ok(_) => {}
        Err(nix::errno::Errno::ENOENT) => return true, // already gone: check again at once
        Err(_) => return false,
    }
    let ms = max.as_millis().min(i32::MAX as u128) as i32;
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, timeout);
    true
}

#[cfg(test)]
mod tests;
