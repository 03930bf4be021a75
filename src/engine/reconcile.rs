//! The reconcile phase: hold the uidlist lock of every folder at once, bring the copy to
//! exactly what the source holds at that instant, copy the control files, release.
//!
//! Locks are taken in a fixed order, each with a short wait; if one is busy, all are
//! released and the attempt repeated after a random pause, so we never hold one lock while
//! waiting for another that Dovecot holds.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::copy;
use super::scan::{dir_stamps, list_folder, partial_listing, Listed, Listing};
use super::watch::Watcher;
use super::sync::{FolderState, Tree};
use super::BackupError;
use crate::dotlock::{self, DotLock, LockError, LockSettings};
use crate::maildir::{Folder, FOLDER_CONTROL_FILES, UIDLIST};

/// How long to wait for the first lock of a round, while holding none.
const FIRST_LOCK_WAIT: Duration = Duration::from_millis(1000);
/// How long to wait for each further lock, while holding others (and so blocking Dovecot on
/// those folders): only a moment, then back off from all of them.
const NEXT_LOCK_WAIT: Duration = Duration::from_millis(20);

/// Locks held on every folder for the reconcile, however they were taken.
pub trait HeldLocks {
    /// Refreshes the locks so a long reconcile never looks stale.
    fn touch(&self) {}
    /// Releases everything; warnings say if a lock was taken from us.
    fn release(self: Box<Self>, warnings: &mut Vec<String>);
}

fn jitter(attempt: u32) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    let base = 20u64 * u64::from(attempt.min(10));
    Duration::from_millis(base + u64::from(u16::from_ne_bytes(b)) % (50 + base * 2))
}

/// Takes `n` locks all or none. `try_one(i, wait)` gives the lock (dropping it releases it),
/// or `Err(why)` if it is busy after `wait`. If one is busy, all taken are released and the
/// round repeated after a random pause, until `timeout`: never hold one while waiting for
/// another that Dovecot holds. Returns the locks and when the successful round began.
pub fn lock_all_or_none<T>(
    n: usize,
    timeout: Duration,
    attempts: &mut u32,
    mut try_one: impl FnMut(usize, Duration) -> Result<Result<T, String>, BackupError>,
) -> Result<(Vec<T>, Instant), BackupError> {
    let started = Instant::now();
    // A timeout too large to represent means: keep trying (for a century).
    let deadline = started.checked_add(timeout).unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));
    loop {
        *attempts += 1;
        let since = Instant::now();
        let mut held = Vec::with_capacity(n);
        let mut busy = None;
        for i in 0..n {
            let per_lock = if held.is_empty() { FIRST_LOCK_WAIT } else { NEXT_LOCK_WAIT };
            let wait = deadline.saturating_duration_since(Instant::now()).min(per_lock);
            match try_one(i, wait)? {
                Ok(lock) => held.push(lock),
                Err(why) => {
                    busy = Some(why);
                    break;
                }
            }
        }
        let Some(why) = busy else { return Ok((held, since)) };
        drop(held);
        if Instant::now() >= deadline {
            return Err(BackupError::LockTimeout { waited: started.elapsed(), attempts: *attempts, why });
        }
        std::thread::sleep(jitter(*attempts).min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Dot-locks on every folder's dovecot-uidlist, refreshed from one background thread.
pub struct DotLockSet {
    locks: Vec<DotLock>,
    _refresher: dotlock::Refresher,
}

impl HeldLocks for DotLockSet {
    fn release(self: Box<Self>, warnings: &mut Vec<String>) {
        let DotLockSet { locks, _refresher } = *self;
        drop(_refresher);
        for lock in locks {
            let held = lock.held_for();
            let path = lock.lock_path().to_path_buf();
            let dir_gone = path.parent().map(|p| !p.exists()).unwrap_or(false);
            match lock.release() {
                Ok(outcome) if !dir_gone => warnings.extend(dotlock::release_warning(&path, outcome, held)),
                Ok(_) => {} // the folder was deleted while we held it: its lock went with it
                Err(e) => warnings.push(format!("releasing {}: {e}", path.display())),
            }
        }
    }
}

/// Locks the uidlist of every folder with our own dot-lock. Folders whose control dir does
/// not exist yet (Dovecot never opened them) have nothing to protect and are skipped.
pub fn dotlock_all(folders: &[Folder], set: &LockSettings, attempts: &mut u32) -> Result<(DotLockSet, Instant), BackupError> {
    let mut order: Vec<&Folder> = folders.iter().filter(|f| f.control_dir.is_dir()).collect();
    order.sort_by(|a, b| a.control_dir.cmp(&b.control_dir));
    let (locks, since) = lock_all_or_none(order.len(), set.timeout, attempts, |i, wait| {
        let quick = LockSettings { timeout: wait, ..set.clone() };
        match DotLock::acquire(&order[i].control_dir.join(UIDLIST), &quick) {
            Ok(l) => Ok(Ok(Some(l))),
            Err(e @ LockError::Timeout { .. }) => Ok(Err(e.to_string())),
            // Deleted since we listed it: nothing left to protect; the relist sees it gone.
            Err(LockError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound && !order[i].control_dir.exists() => {
                Ok(Ok(None))
            }
            Err(e) => Err(e.into()),
        }
    })?;
    let locks: Vec<DotLock> = locks.into_iter().flatten().collect();
    let refresher = dotlock::keep_all_fresh(&locks, dotlock::TOUCH_INTERVAL);
    Ok((DotLockSet { locks, _refresher: refresher }, since))
}

/// True if a folder's cur/ and new/ are provably unchanged since it was last listed: same
/// stamps, and they were already older than a second when taken (so a change in the same
/// clock tick cannot hide). Never trusted on NFS, where directory times are cached.
pub fn unchanged_since_listing(state: &FolderState, nfs: bool) -> bool {
    if nfs {
        return false;
    }
    let Some(listed_at) = state.listed_at else { return false };
    let now = dir_stamps(&state.folder.mail_dir);
    if now != state.stamps || now.iter().any(|s| s.is_none()) {
        return false;
    }
    let fresh_limit = listed_at.checked_sub(Duration::from_secs(1)).unwrap_or(SystemTime::UNIX_EPOCH);
    let limit = fresh_limit.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    ["cur", "new"].iter().all(|sub| {
        fs::symlink_metadata(state.folder.mail_dir.join(sub))
            .map(|md| std::os::unix::fs::MetadataExt::mtime(&md) < limit)
            .unwrap_or(false)
    })
}

/// Lists what may have changed: for a watched folder only the names inotify reported, for
/// others the whole folder unless its directories are provably unchanged. `force` lists
/// every folder in full. New folders are watched before their first listing.
pub fn relist(
    tree: &Tree,
    folders: &[Folder],
    nfs: bool,
    force: bool,
    mut watcher: Option<&mut Watcher>,
) -> Result<Vec<(Folder, Option<Listing>)>, BackupError> {
    if let Some(w) = watcher.as_deref_mut() {
        w.drain();
    }
    let mut out = Vec::new();
    for f in folders {
        let state = tree.folders.get(&f.rel);
        let changes = if force { None } else { watcher.as_deref_mut().and_then(|w| w.take(&f.rel)) };
        match (state, changes) {
            (Some(state), Some(changes)) => {
                if !changes.is_empty() {
                    let listing = partial_listing(&f.mail_dir, &changes, |key| {
                        state.entries.get(key).map(|e| Listed { sub: e.sub, name: e.name.clone() })
                    });
                    out.push((f.clone(), Some(listing)));
                }
            }
            (state, _) => {
                if !force && state.is_some_and(|s| unchanged_since_listing(s, nfs)) {
                    continue;
                }
                out.push((f.clone(), watch_and_list(f, watcher.as_deref_mut())?));
            }
        }
    }
    // Folders we have but the source no longer has.
    for (rel, state) in &tree.folders {
        if !folders.iter().any(|f| &f.rel == rel) {
            out.push((state.folder.clone(), None));
        }
    }
    Ok(out)
}

/// Watches a folder (if there is a watcher), then lists it in full.
pub fn watch_and_list(f: &Folder, watcher: Option<&mut Watcher>) -> Result<Option<Listing>, BackupError> {
    if let Some(w) = watcher {
        w.watch(&f.rel, &f.mail_dir);
    }
    listing_or_gone(f)
}

/// A folder's listing, or None if the folder has been deleted.
pub fn listing_or_gone(f: &Folder) -> Result<Option<Listing>, BackupError> {
    match list_folder(&f.mail_dir) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn control_io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackupError + 'a {
    move |source| BackupError::Io { op, path: path.to_path_buf(), source }
}

/// (source, copy) of every control file a self-contained backup carries: each folder's
/// dovecot-uidlist and dovecot-keywords (from its control dir) and maildirfolder, placed in
/// the folder itself, and the per-user files in the root.
fn control_pairs(tree: &Tree, control_root: &Path) -> Result<Vec<(PathBuf, PathBuf)>, BackupError> {
    let mut pairs = Vec::new();
    for (rel, state) in &tree.folders {
        let dst_dir = tree.staged_dir(rel);
        for name in FOLDER_CONTROL_FILES {
            pairs.push((state.folder.control_dir.join(name), dst_dir.join(name)));
        }
        pairs.push((state.folder.mail_dir.join("maildirfolder"), dst_dir.join("maildirfolder")));
    }
    for entry in fs::read_dir(control_root).map_err(control_io("read directory", control_root))?.flatten() {
        let name = entry.file_name();
        let n = name.to_string_lossy();
        let wanted = n == "subscriptions" || n == "dovecot-uidvalidity" || n.starts_with("dovecot-uidvalidity.");
        if wanted && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            pairs.push((entry.path(), tree.staging.join(&name)));
        }
    }
    Ok(pairs)
}

/// A control file copied before the lock. Its source stays open so its inode cannot be
/// reused: under the lock, the same inode with the same size is the same content, and the
/// same inode grown is our copy plus an appended tail (Dovecot only ever appends to
/// dovecot-uidlist in place; every other change is a new file renamed over it).
struct Precopied {
    source: fs::File,
    len: u64,
}

#[derive(Default)]
pub struct ControlFiles {
    by_dest: HashMap<PathBuf, Precopied>,
}

/// Copies `src` to `dst` (replacing it) with its metadata; the open source and the bytes
/// copied, or None if there is no source.
fn copy_control(src: &Path, dst: &Path, keep_owner: bool) -> Result<Option<Precopied>, BackupError> {
    let mut source = match copy::open_nofollow(src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            remove_if_there(dst)?;
            return Ok(None);
        }
        Err(e) => return Err(control_io("read control file", src)(e)),
    };
    let tmp = dst.with_extension("maildir-backup-tmp");
    let mut out = fs::File::create(&tmp).map_err(control_io("create", &tmp))?;
    let len = io::copy(&mut source, &mut out).map_err(control_io("copy control file", src))?;
    let md = source.metadata().map_err(control_io("fstat", src))?;
    copy::apply_metadata(&out, &md, keep_owner).map_err(control_io("set metadata of", &tmp))?;
    fs::rename(&tmp, dst).map_err(control_io("rename into place", dst))?;
    Ok(Some(Precopied { source, len }))
}

fn remove_if_there(path: &Path) -> Result<(), BackupError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(control_io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Copies each folder's dovecot-uidlist before the lock (the only big control file), so that
/// under the lock only what was appended since is copied. The sources stay open, within a
/// share of the descriptor limit; whatever is over it is copied under the lock instead.
pub fn precopy_control_files(tree: &Tree, control_root: &Path) -> Result<ControlFiles, BackupError> {
    let budget = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| (soft.min(1 << 20) as usize).saturating_sub(256) / 2)
        .unwrap_or(256);
    let mut files = ControlFiles::default();
    for (src, dst) in control_pairs(tree, control_root)? {
        if files.by_dest.len() >= budget {
            break;
        }
        if dst.file_name().is_some_and(|n| n == UIDLIST) {
            if let Some(p) = copy_control(&src, &dst, tree.keep_owner)? {
                files.by_dest.insert(dst, p);
            }
        }
    }
    Ok(files)
}

/// Brings the control files to what they are now. Called with the locks held: an unchanged
/// file costs a stat, an appended uidlist only its new lines.
pub fn copy_control_files(tree: &Tree, control_root: &Path, mut pre: ControlFiles) -> Result<(), BackupError> {
    let pairs = control_pairs(tree, control_root)?;
    let current: std::collections::HashSet<PathBuf> = pairs.iter().map(|(_, d)| d.clone()).collect();
    for (src, dst) in pairs {
        let now = match fs::symlink_metadata(&src) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                remove_if_there(&dst)?;
                continue;
            }
            Err(e) => return Err(control_io("stat", &src)(e)),
        };
        // Only dovecot-uidlist is changed in place solely by appending; other control files
        // are rewritten (dovecot-uidvalidity even in place at the same size): copy afresh.
        let appendable = dst.file_name().is_some_and(|n| n == UIDLIST);
        if let Some(p) = pre.by_dest.remove(&dst).filter(|_| appendable).as_mut() {
            let then = p.source.metadata().map_err(control_io("fstat", &src))?;
            if then.dev() == now.dev() && then.ino() == now.ino() && now.len() >= p.len {
                if now.len() > p.len {
                    append_tail(p, &dst, &now, tree.keep_owner).map_err(control_io("append to", &dst))?;
                }
                continue;
            }
        }
        copy_control(&src, &dst, tree.keep_owner)?;
    }
    // Copied before the lock, gone since (e.g. a dovecot-uidvalidity.* marker renamed away).
    for dst in pre.by_dest.into_keys() {
        if !current.contains(&dst) {
            remove_if_there(&dst)?;
        }
    }
    Ok(())
}

/// Appends what was added to the source after `p.len` and takes the source's times.
fn append_tail(p: &mut Precopied, dst: &Path, now: &fs::Metadata, keep_owner: bool) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    p.source.seek(SeekFrom::Start(p.len))?;
    let mut out = fs::OpenOptions::new().append(true).custom_flags(libc::O_NOFOLLOW).open(dst)?;
    p.len += io::copy(&mut p.source, &mut out)?;
    copy::apply_metadata(&out, now, keep_owner)
}
