//! The reconcile phase: hold the uidlist lock of every folder at once, bring the copy to
//! exactly what the source holds at that instant, copy the control files, release.
//!
//! Locks are taken in a fixed order, each with a short wait; if one is busy, all are
//! released and the attempt repeated after a random pause, so we never hold one lock while
//! waiting for another that Dovecot holds.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::scan::{dir_stamps, list_folder, open_subdirs, partial_listing, Listed, Listing};
use super::sync::{FolderState, Tree};
use super::watch::Watcher;
use super::{BackupError, BackupOptions};
use crate::dotlock::{self, DotLock, LockError, LockSettings};
use crate::fsx::{self, Dir, FsError, Meta, ReadFile, Replace};
use crate::maildir::{control_file_limit, is_user_control_file, Folder, Maildir, FOLDER_CONTROL_FILES, MAILDIRFOLDER, UIDLIST};

/// How long to wait for the first lock of a round, while holding none.
const FIRST_LOCK_WAIT: Duration = Duration::from_millis(1000);
/// How long to wait for each further lock, while holding others (and so blocking Dovecot on
/// those folders): only a moment, then back off from all of them.
pub const NEXT_LOCK_WAIT: Duration = Duration::from_millis(20);

/// Locks held on every folder for the reconcile, however they were taken.
pub trait HeldLocks {
    /// Refreshes the locks so a long reconcile never looks stale.
    fn touch(&self) {}
    /// Also locks `more`, folders that appeared after the locks were taken, waiting only a
    /// moment for each (`NEXT_LOCK_WAIT`): Ok(Err(busy)) if one stays busy.
    fn add(&mut self, md: &Maildir, more: &[Folder], opts: &BackupOptions, warnings: &mut Vec<String>)
        -> Result<Result<(), Busy>, BackupError>;
    /// Releases everything; warnings say if a lock was taken from us.
    fn release(self: Box<Self>, warnings: &mut Vec<String>);
}

/// A folder whose lock stayed busy, and what held it.
#[derive(Debug, Clone)]
pub struct Busy {
    pub folder: String,
    pub why: String,
}

fn jitter(attempt: u32) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    let base = 20u64 * u64::from(attempt.min(10));
    Duration::from_millis(base + u64::from(u16::from_ne_bytes(b)) % (50 + base * 2))
}

/// Takes `n` locks all or none. `try_one(i, wait)` gives lock `i` (dropping it releases it),
/// or `Err(why)` if it is busy after `wait`. If one is busy, all taken are released and the
/// round repeated after a random pause, until `timeout`: never hold one while waiting for
/// another that Dovecot holds. The lock found busy is tried first in the next round, with the
/// long wait of a round's first lock (holding none then), so that a folder Dovecot keeps busy
/// cannot fail every round at its 20 ms. Returns the locks and when the first was taken.
pub fn lock_all_or_none<T>(
    n: usize,
    timeout: Duration,
    attempts: &mut u32,
    mut try_one: impl FnMut(usize, Duration) -> Result<Result<T, String>, BackupError>,
) -> Result<(Vec<T>, Instant), BackupError> {
    let started = Instant::now();
    // A timeout too large to represent means: keep trying (for a century).
    let deadline = started.checked_add(timeout).unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));
    let mut order: Vec<usize> = (0..n).collect();
    loop {
        *attempts += 1;
        // The hold begins with the first lock taken (waiting for it holds nothing).
        let mut since = Instant::now();
        let mut held = Vec::with_capacity(n);
        let mut busy = None;
        for (pos, &i) in order.iter().enumerate() {
            let per_lock = if held.is_empty() { FIRST_LOCK_WAIT } else { NEXT_LOCK_WAIT };
            let wait = deadline.saturating_duration_since(Instant::now()).min(per_lock);
            match try_one(i, wait)? {
                Ok(lock) => {
                    if held.is_empty() {
                        since = Instant::now();
                    }
                    held.push(lock)
                }
                Err(why) => {
                    busy = Some((pos, why));
                    break;
                }
            }
        }
        let Some((pos, why)) = busy else { return Ok((held, since)) };
        drop(held);
        if Instant::now() >= deadline {
            return Err(BackupError::LockTimeout { timeout, waited: started.elapsed(), attempts: *attempts, why });
        }
        let first = order.remove(pos);
        order.insert(0, first);
        std::thread::sleep(jitter(*attempts).min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Dot-locks on every folder's dovecot-uidlist, refreshed from one background thread.
pub struct DotLockSet {
    locks: Vec<DotLock>,
    _refresher: dotlock::Refresher,
}

impl HeldLocks for DotLockSet {
    fn add(&mut self, md: &Maildir, more: &[Folder], opts: &BackupOptions, warnings: &mut Vec<String>)
        -> Result<Result<(), Busy>, BackupError> {
        for f in more {
            let Some(dir) = control_dir_to_lock(md, f, warnings)? else { continue };
            match lock_one(&dir, &opts.lock, NEXT_LOCK_WAIT)? {
                Ok(Some(l)) => {
                    self._refresher.add(&l);
                    self.locks.push(l);
                }
                Ok(None) => {}
                Err(why) => return Ok(Err(Busy { folder: f.name.clone(), why })),
            }
        }
        Ok(Ok(()))
    }

    fn release(self: Box<Self>, warnings: &mut Vec<String>) {
        let DotLockSet { locks, _refresher } = *self;
        drop(_refresher);
        for lock in locks {
            let held = lock.held_for();
            let path = lock.lock_path();
            // The folder was deleted while we held it: its lock went with it.
            let dir_gone = lock.dir_removed();
            match lock.release() {
                Ok(outcome) if !dir_gone => warnings.extend(dotlock::release_warning(&path, outcome, held)),
                Ok(_) => {}
                Err(e) => warnings.push(format!("releasing {}: {e}", path.display())),
            }
        }
    }
}

/// A folder's control dir, if it has one to lock (Dovecot never opened a folder without it);
/// one replaced by a symlink is never followed, and reported.
fn control_dir_to_lock(md: &Maildir, f: &Folder, warnings: &mut Vec<String>) -> Result<Option<Arc<Dir>>, BackupError> {
    match md.control_dir(f) {
        Ok(d) => Ok(d.map(Arc::new)),
        Err(e) if e.is_planted() => {
            warnings.push(format!("not locked: {e}"));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// One folder's uidlist lock, waiting up to `wait`: Ok(None) if the folder was deleted
/// meanwhile (nothing left to protect), Err(why) if it stays busy.
fn lock_one(dir: &Arc<Dir>, set: &LockSettings, wait: Duration) -> Result<Result<Option<DotLock>, String>, BackupError> {
    let quick = LockSettings { timeout: wait, ..set.clone() };
    match DotLock::acquire_in(dir, UIDLIST, &quick) {
        Ok(l) => Ok(Ok(Some(l))),
        Err(e @ LockError::Timeout { .. }) => Ok(Err(e.to_string())),
        // Deleted since we listed it: the relist sees it gone.
        Err(_) if dir.is_removed() => Ok(Ok(None)),
        // Our lock file vanished as we made it: the folder is being deleted (Dovecot empties
        // it, then removes it). As good as busy: let go of all and look again.
        Err(LockError::Fs(e)) if e.is_not_found() => Ok(Err(format!("{e} (the folder is being deleted)"))),
        Err(e) => Err(e.into()),
    }
}

/// Locks the uidlist of every folder with our own dot-lock, all or none.
pub fn dotlock_all(md: &Maildir, folders: &[Folder], set: &LockSettings, attempts: &mut u32, warnings: &mut Vec<String>)
    -> Result<(DotLockSet, Instant), BackupError> {
    let mut order: Vec<(&Folder, Arc<Dir>)> = Vec::with_capacity(folders.len());
    for f in folders {
        if let Some(d) = control_dir_to_lock(md, f, warnings)? {
            order.push((f, d));
        }
    }
    order.sort_by(|a, b| a.0.control_rel.cmp(&b.0.control_rel));
    let (locks, since) = lock_all_or_none(order.len(), set.timeout, attempts, |i, wait| lock_one(&order[i].1, set, wait))?;
    let locks: Vec<DotLock> = locks.into_iter().flatten().collect();
    let refresher = dotlock::keep_all_fresh(&locks, dotlock::TOUCH_INTERVAL);
    Ok((DotLockSet { locks, _refresher: refresher }, since))
}

/// True if a folder's cur/ and new/ are provably unchanged since it was last listed: same
/// stamps, and they were already older than a second when taken (so a change in the same
/// clock tick cannot hide). Never trusted on NFS, where directory times are cached.
pub fn unchanged_since_listing(md: &Maildir, state: &FolderState, nfs: bool) -> bool {
    if nfs {
        return false;
    }
    let Some(listed_at) = state.listed_at else { return false };
    let now = dir_stamps(md, &state.folder);
    if now != state.stamps || now.iter().any(|s| s.is_none()) {
        return false;
    }
    let fresh_limit = listed_at.checked_sub(Duration::from_secs(1)).unwrap_or(SystemTime::UNIX_EPOCH);
    let limit = fresh_limit.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    now.iter().flatten().all(|s| s.mtime() < limit)
}

/// Lists what may have changed: for a watched folder only the names inotify reported, for
/// others the whole folder unless its directories are provably unchanged. New folders are
/// watched before their first listing.
pub fn relist(
    md: &Maildir,
    tree: &Tree,
    folders: &[Folder],
    nfs: bool,
    mut watcher: Option<&mut Watcher>,
) -> Result<Vec<(Folder, Option<Listing>)>, BackupError> {
    if let Some(w) = watcher.as_deref_mut() {
        w.drain();
    }
    let mut out = Vec::new();
    for f in folders {
        let state = tree.folders.get(&f.rel);
        let changes = watcher.as_deref_mut().and_then(|w| w.take(&f.rel));
        match (state, changes) {
            (Some(state), Some(changes)) => {
                if changes.is_empty() {
                    continue;
                }
                let Some(dir) = folder_dir_or_gone(md, f)? else {
                    out.push((f.clone(), None));
                    continue;
                };
                let mut warnings = Vec::new();
                let subs = open_subdirs(&dir, &mut warnings)?;
                let mut listing = partial_listing(&subs, &changes, |key| {
                    state.entries.get(key).map(|e| Listed { sub: e.sub, name: e.name.clone() })
                });
                listing.warnings.extend(warnings);
                out.push((f.clone(), Some(listing)));
            }
            (state, _) => {
                if state.is_some_and(|s| unchanged_since_listing(md, s, nfs)) {
                    continue;
                }
                out.push((f.clone(), watch_and_list(md, f, watcher.as_deref_mut())?));
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

/// A folder's directory, or None if it has been deleted (or replaced by a symlink, which is
/// never followed: to us the folder is gone).
fn folder_dir_or_gone(md: &Maildir, f: &Folder) -> Result<Option<Dir>, BackupError> {
    match md.folder_dir(f) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.is_not_found() || e.is_planted() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Watches a folder (if there is a watcher), then lists it in full; None if it is gone.
pub fn watch_and_list(md: &Maildir, f: &Folder, watcher: Option<&mut Watcher>) -> Result<Option<Listing>, BackupError> {
    let Some(dir) = folder_dir_or_gone(md, f)? else { return Ok(None) };
    let mut warnings = Vec::new();
    let subs = open_subdirs(&dir, &mut warnings)?;
    if let Some(w) = watcher {
        w.watch(&f.rel, &subs);
    }
    let mut listing = list_folder(&subs)?;
    listing.warnings.extend(warnings);
    Ok(Some(listing))
}

/// The control files of one source directory, and where each goes in the staged copy.
struct ControlGroup<'a> {
    /// The directory they are in: a folder's control dir or mail dir, or the control root.
    from: ControlDir<'a>,
    /// (file name, path in the staged copy)
    files: Vec<(String, PathBuf)>,
}

#[derive(Clone, Copy)]
enum ControlDir<'a> {
    Control(&'a Folder),
    Mail(&'a Folder),
    UserRoot,
}

/// Every control file a self-contained backup carries: each folder's dovecot-uidlist and
/// dovecot-keywords (from its control dir) and maildirfolder, placed in the folder itself,
/// and the per-user files in the root.
fn control_groups<'a>(md: &Maildir, tree: &'a Tree) -> Result<Vec<ControlGroup<'a>>, BackupError> {
    let mut groups = Vec::new();
    for (rel, state) in &tree.folders {
        let files = FOLDER_CONTROL_FILES.iter().map(|n| (n.to_string(), rel.join(n))).collect();
        groups.push(ControlGroup { from: ControlDir::Control(&state.folder), files });
        groups.push(ControlGroup { from: ControlDir::Mail(&state.folder), files: vec![(MAILDIRFOLDER.to_string(), rel.join(MAILDIRFOLDER))] });
    }
    let mut user_files = Vec::new();
    if let Some(root) = md.control_root() {
        for entry in root.list()? {
            let Some(name) = entry.name.to_str() else { continue };
            if is_user_control_file(name) {
                user_files.push((name.to_string(), PathBuf::from(name)));
            }
        }
    }
    groups.push(ControlGroup { from: ControlDir::UserRoot, files: user_files });
    Ok(groups)
}

impl ControlGroup<'_> {
    /// The source directory; None if it does not exist (or is a planted symlink: warned).
    fn open(&self, md: &Maildir, warnings: &mut Vec<String>) -> Result<Option<Dir>, BackupError> {
        let r = match self.from {
            ControlDir::Control(f) => md.control_dir(f),
            ControlDir::Mail(f) => md.root.sub_opt(&f.rel),
            ControlDir::UserRoot => Ok(md.control_root().map(Dir::try_clone).transpose()?),
        };
        match r {
            Ok(d) => Ok(d),
            Err(e) if e.is_planted() => {
                warnings.push(format!("control files not copied: {e}"));
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A control file copied before the lock. Its source stays open so its inode cannot be
/// reused: under the lock, the same inode with the same size is the same content, and the
/// same inode grown is our copy plus an appended tail (Dovecot only ever appends to
/// dovecot-uidlist in place; every other change is a new file renamed over it).
struct Precopied {
    source: ReadFile,
    len: u64,
}

#[derive(Default)]
pub struct ControlFiles {
    by_dest: HashMap<PathBuf, Precopied>,
}

/// Copies `name` from `src` to `dst` in the staging dir (replacing it), with its metadata;
/// the open source and the bytes copied, or None if there is no usable source (a planted
/// one is reported in `warnings`).
fn copy_control(src: &Dir, name: &str, tree: &Tree, dst: &Path, warnings: &mut Vec<String>) -> Result<Option<Precopied>, BackupError> {
    let limit = control_file_limit(name);
    let mut source = match src.open_read_opt(name) {
        Ok(Some(f)) if f.meta.size() <= limit && f.meta.nlink() == 1 => f,
        Ok(Some(f)) => {
            // Dovecot's control files have one name each: a linked one would be stored once
            // per name (a thousand links cost their owner nothing, and us a thousand copies).
            let why = if f.meta.nlink() > 1 {
                format!("{} has {} names; Dovecot's control files have one", fsx::shown(&f.path), f.meta.nlink())
            } else {
                FsError::TooBig { path: f.path, size: f.meta.size(), limit, what: "this control file" }.to_string()
            };
            warnings.push(format!("skipped {why}"));
            tree.staging.unlink(dst)?;
            return Ok(None);
        }
        Ok(None) => {
            tree.staging.unlink(dst)?;
            return Ok(None);
        }
        Err(e) if e.is_planted() => {
            warnings.push(format!("skipped {e}"));
            tree.staging.unlink(dst)?;
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let dir = tree.staging.sub(dst.parent().unwrap_or(Path::new("")))?;
    let file_name = dst.file_name().and_then(|n| n.to_str()).unwrap_or(name);
    let (tmp, out) = dir.create_temp(&format!(".{file_name}.maildir-backup"), 0o600)?;
    let owner = tree.keep_owner.then(|| source.meta.owner());
    let copied = fsx::copy_file(&mut source, &out, owner);
    let len = match copied {
        Ok(c) => c.size,
        Err(fail) => {
            let _ = dir.unlink(&tmp);
            return Err(match fail {
                fsx::CopyFail::Source(e) => FsError::Io { op: "read control file", path: source.path, source: e },
                fsx::CopyFail::Dest(e) => FsError::Io { op: "write", path: dir.show(&tmp), source: e },
            }
            .into());
        }
    };
    dir.rename(&tmp, &dir, file_name, Replace::Allowed)?;
    Ok(Some(Precopied { source, len }))
}

/// Copies each folder's dovecot-uidlist before the lock (the only big control file), so that
/// under the lock only what was appended since is copied. The sources stay open, within a
/// share of the descriptor limit; whatever is over it is copied under the lock instead.
pub fn precopy_control_files(md: &Maildir, tree: &Tree, warnings: &mut Vec<String>) -> Result<ControlFiles, BackupError> {
    let budget = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| (soft.min(1 << 20) as usize).saturating_sub(256) / 2)
        .unwrap_or(256);
    let mut files = ControlFiles::default();
    for group in control_groups(md, tree)? {
        if files.by_dest.len() >= budget {
            break;
        }
        let Some((name, dst)) = group.files.iter().find(|(n, _)| n == UIDLIST) else { continue };
        let Some(src) = group.open(md, warnings)? else { continue };
        if let Some(p) = copy_control(&src, name, tree, dst, warnings)? {
            files.by_dest.insert(dst.clone(), p);
        }
    }
    Ok(files)
}

/// Brings the control files to what they are now. Called with the locks held: an unchanged
/// file costs a stat, an appended uidlist only its new lines.
pub fn copy_control_files(md: &Maildir, tree: &Tree, mut pre: ControlFiles, warnings: &mut Vec<String>) -> Result<(), BackupError> {
    let groups = control_groups(md, tree)?;
    let current: HashSet<&PathBuf> = groups.iter().flat_map(|g| g.files.iter().map(|(_, d)| d)).collect();
    for group in &groups {
        let src = group.open(md, warnings)?;
        for (name, dst) in &group.files {
            let Some(src) = &src else {
                tree.staging.unlink(dst)?;
                continue;
            };
            let now = match src.lstat(name)? {
                Some(m) if m.is_file() && m.nlink() == 1 => m,
                _ => {
                    // Gone, or planted: copy_control says which and removes our copy.
                    copy_control(src, name, tree, dst, warnings)?;
                    continue;
                }
            };
            // Only dovecot-uidlist is changed in place solely by appending; other control files
            // are rewritten (dovecot-uidvalidity even in place at the same size): copy afresh.
            if let Some(p) = pre.by_dest.remove(dst).filter(|_| name == UIDLIST).as_mut() {
                let same = p.source.meta.dev() == now.dev() && p.source.meta.ino() == now.ino();
                if same && now.size() >= p.len && now.size() <= control_file_limit(name) {
                    if now.size() > p.len {
                        append_tail(p, tree, dst, &now)?;
                    }
                    continue;
                }
            }
            copy_control(src, name, tree, dst, warnings)?;
        }
    }
    // Copied before the lock, gone since (e.g. a dovecot-uidvalidity.* marker renamed away).
    for dst in pre.by_dest.into_keys() {
        if !current.contains(&dst) {
            tree.staging.unlink(&dst)?;
        }
    }
    Ok(())
}

/// Appends what was added to the source after `p.len` (up to its size now) and takes the
/// source's times.
fn append_tail(p: &mut Precopied, tree: &Tree, dst: &Path, now: &Meta) -> Result<(), BackupError> {
    let err = |op, path: PathBuf| move |e: io::Error| BackupError::Fs(FsError::Io { op, path, source: e });
    let out = tree.staging.open_append(dst)?;
    p.source.file.seek(SeekFrom::Start(p.len)).map_err(err("seek", p.source.path.clone()))?;
    let mut tail = (&p.source.file).take(now.size() - p.len);
    p.len += io::copy(&mut tail, &mut &out).map_err(err("append to", tree.staging.show(dst)))?;
    fsx::apply(&out, now, tree.keep_owner.then(|| now.owner())).map_err(err("set metadata of", tree.staging.show(dst)))?;
    Ok(())
}

#[cfg(test)]
mod tests;
