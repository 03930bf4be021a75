//! The reconcile phase: hold the uidlist lock of every folder at once, bring the copy to
//! exactly what the source holds at that instant, open the control files, release (and copy
//! them after).
//!
//! Locks are taken in rounds, each lock with a short wait; if one is busy, all are let go,
//! so we never hold one lock while waiting long for another that Dovecot holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::scan::{dir_stamps, list_folder, open_subdirs, partial_listing, Listed, Listing};
use super::sync::{FolderState, Reuse, Tree};
use super::watch::Watcher;
use super::{BackupError, BackupOptions};
use crate::dotlock::{self, DotLock, LockError, LockSettings};
use crate::fsx::{self, Dir, FsError, ReadFile, Replace};
use crate::maildir::{control_file_limit, is_user_control_file, Folder, Maildir, FOLDER_CONTROL_FILES, MAILDIRFOLDER, UIDLIST};

/// How long the first lock of a round may be waited for (holding none), and each further one
/// (holding others, so blocking Dovecot on those folders): only moments. Whatever changes in
/// the source while a round waits is work for the pass under the locks.
pub const FIRST_LOCK_WAIT: Duration = Duration::from_millis(10);
pub const NEXT_LOCK_WAIT: Duration = Duration::from_millis(3);
/// How long a lock found busy is waited for between rounds, holding none (taken and let go at
/// once: only to learn that it was let go).
pub const BUSY_LOCK_WAIT: Duration = Duration::from_millis(1000);

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

/// A random pause before round `attempt + 1` (up to 20 ms, and 2 ms more for each of the
/// first ten rounds that failed): so that two lockers that keep meeting fall out of step.
pub fn jitter(attempt: u32) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    let spread = 20 + 2 * u64::from(attempt.min(10));
    Duration::from_millis(u64::from(u16::from_ne_bytes(b)) % (spread + 1))
}

/// One round of taking `n` locks, all or none, in order: `try_one(i, wait)` gives lock `i`
/// (dropping it releases it), or `Err(why)` if it is busy after `wait`: `first_wait` for the
/// first, `NEXT_LOCK_WAIT` for the others, so one lock is never held while another that
/// Dovecot holds is waited for long. Returns the locks and when the first was taken, or (all
/// taken let go) which one was busy and why.
pub fn lock_round<T>(
    n: usize,
    first_wait: Duration,
    mut try_one: impl FnMut(usize, Duration) -> Result<Result<T, String>, BackupError>,
) -> Result<Result<(Vec<T>, Instant), (usize, String)>, BackupError> {
    // The hold begins with the first lock taken (waiting for it holds nothing).
    let mut since = None;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        match try_one(i, if held.is_empty() { first_wait } else { NEXT_LOCK_WAIT })? {
            Ok(lock) => {
                since.get_or_insert_with(Instant::now);
                held.push(lock);
            }
            Err(why) => return Ok(Err((i, why))),
        }
    }
    Ok(Ok((held, since.unwrap_or_else(Instant::now))))
}

/// Dot-locks on every folder's dovecot-uidlist, refreshed from one background thread.
pub struct DotLockSet {
    locks: Vec<DotLock>,
    refresher: dotlock::Refresher,
}

impl HeldLocks for DotLockSet {
    fn add(&mut self, md: &Maildir, more: &[Folder], opts: &BackupOptions, warnings: &mut Vec<String>)
        -> Result<Result<(), Busy>, BackupError> {
        for f in more {
            let Some(dir) = control_dir_to_lock(md, f, warnings)? else { continue };
            match lock_one(&dir, &opts.lock, NEXT_LOCK_WAIT)? {
                Ok(Some(l)) => {
                    self.refresher.add(&l);
                    self.locks.push(l);
                }
                Ok(None) => {}
                Err(why) => return Ok(Err(Busy { folder: f.name.clone(), why })),
            }
        }
        Ok(Ok(()))
    }

    fn release(self: Box<Self>, warnings: &mut Vec<String>) {
        let DotLockSet { locks, refresher } = *self;
        refresher.stop_now();
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

/// One round of locking the uidlist of every folder, in the order given, with our own
/// dot-locks (see `lock_round`).
pub fn dotlock_round(md: &Maildir, folders: &[Folder], set: &LockSettings, first_wait: Duration, warnings: &mut Vec<String>)
    -> Result<Result<(DotLockSet, Instant), Busy>, BackupError> {
    let mut order: Vec<(&Folder, Arc<Dir>)> = Vec::with_capacity(folders.len());
    for f in folders {
        if let Some(d) = control_dir_to_lock(md, f, warnings)? {
            order.push((f, d));
        }
    }
    let (locks, since) = match lock_round(order.len(), first_wait, |i, wait| lock_one(&order[i].1, set, wait))? {
        Ok(taken) => taken,
        Err((i, why)) => return Ok(Err(Busy { folder: order[i].0.name.clone(), why })),
    };
    let locks: Vec<DotLock> = locks.into_iter().flatten().collect();
    let refresher = dotlock::keep_all_fresh(&locks, dotlock::TOUCH_INTERVAL);
    Ok(Ok((DotLockSet { locks, refresher }, since)))
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
    let ns = listed_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    now.iter().flatten().all(|s| s.settled_before(ns))
}

/// Lists what may have changed: for a watched folder only the names inotify reported, for
/// others the whole folder unless its directories are provably unchanged. New folders are
/// watched before their first listing.
pub fn relist(
    md: &Maildir,
    tree: &mut Tree,
    folders: &[Folder],
    nfs: bool,
    mut watcher: Option<&mut Watcher>,
) -> Result<Vec<(Folder, Option<Listing>)>, BackupError> {
    if let Some(w) = watcher.as_deref_mut() {
        w.drain();
    }
    let mut out = Vec::new();
    for f in folders {
        let changes = watcher.as_deref_mut().and_then(|w| w.take(&f.rel));
        match (tree.folders.contains_key(&f.rel), changes) {
            (true, Some(changes)) => {
                if changes.is_empty() {
                    continue;
                }
                tree.load(&f.rel)?;
                let Some(state) = tree.folders.get(&f.rel) else { continue };
                let Some(dir) = folder_dir_or_gone(md, f)? else {
                    out.push((f.clone(), None));
                    continue;
                };
                let mut warnings = Vec::new();
                let subs = open_subdirs(&dir, &mut warnings)?;
                let mut listing = partial_listing(&subs, &changes, |key| {
                    state.entries.get(key).map(|e| Listed { sub: e.sub, name: e.name.to_string() })
                });
                listing.warnings.extend(warnings);
                out.push((f.clone(), Some(listing)));
            }
            _ => {
                if tree.folders.get(&f.rel).is_some_and(|s| unchanged_since_listing(md, s, nfs)) {
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

/// Opens control file `name` in `src`; None if there is no usable one (a planted, linked or
/// oversized one is reported in `warnings`).
fn open_control(src: &Dir, name: &str, warnings: &mut Vec<String>) -> Result<Option<ReadFile>, BackupError> {
    let limit = control_file_limit(name);
    match src.open_read_opt(name) {
        Ok(Some(f)) if f.meta.size() <= limit && f.meta.nlink() == 1 => return Ok(Some(f)),
        Ok(Some(f)) => {
            // Dovecot's control files have one name each: a linked one would be stored once
            // per name (a thousand links cost their owner nothing, and us a thousand copies).
            let why = if f.meta.nlink() > 1 {
                format!("{} has {} names; Dovecot's control files have one", fsx::shown(&f.path), f.meta.nlink())
            } else {
                FsError::TooBig { path: f.path, size: f.meta.size(), limit, what: "this control file" }.to_string()
            };
            warnings.push(format!("skipped {why}"));
        }
        Ok(None) => {}
        Err(e) if e.is_planted() => warnings.push(format!("skipped {e}")),
        Err(e) => return Err(e.into()),
    }
    Ok(None)
}

/// Copies the open control file `source` (up to the size it had when opened) to `dst` in the
/// staging dir, replacing it, with its metadata.
fn write_control(mut source: ReadFile, tree: &Tree, dst: &Path, reuse: Option<&dyn Reuse>) -> Result<(), BackupError> {
    let dir = tree.staging.sub(dst.parent().unwrap_or(Path::new("")))?;
    let file_name = dst.file_name().and_then(|n| n.to_str()).unwrap_or(UIDLIST);
    let owner = tree.keep_owner.then(|| source.meta.owner());
    // Unchanged since the previous snapshot (most folders, most nights): linked, not written.
    if let Some(r) = reuse {
        if r.link_control(dst, &mut source, owner, &dir, file_name) {
            tree.linked_control.lock().unwrap_or_else(|p| p.into_inner()).insert(dst.to_path_buf());
            return Ok(());
        }
        std::io::Seek::rewind(&mut source.file).map_err(|e| FsError::Io { op: "read control file", path: source.path.clone(), source: e })?;
    }
    let (tmp, out) = dir.create_temp(&format!(".{file_name}.maildir-backup"), 0o600)?;
    if let Err(fail) = fsx::copy_file(&mut source, &out, owner) {
        let _ = dir.unlink(&tmp);
        return Err(match fail {
            fsx::CopyFail::Source(e) => FsError::Io { op: "read control file", path: source.path, source: e },
            fsx::CopyFail::Dest(e) => FsError::Io { op: "write", path: dir.show(&tmp), source: e },
        }
        .into());
    }
    dir.rename(&tmp, &dir, file_name, Replace::Allowed)?;
    Ok(())
}

/// The control files as they were under the locks: opened then, written into the staged copy
/// by `write` once the locks are let go. Dovecot changes a control file in place only by
/// appending to dovecot-uidlist (anything else is a new file renamed over the old), so what an
/// open file held up to its size then is what it held at the instant.
#[derive(Default)]
pub struct CapturedControl {
    files: Vec<(ReadFile, PathBuf)>,
}

/// Under the locks: opens every control file, to be copied once the locks are let go. Past
/// a share of the descriptor limit, files are copied at once instead.
pub fn capture_control_files(md: &Maildir, tree: &Tree, reuse: Option<&dyn Reuse>, warnings: &mut Vec<String>) -> Result<CapturedControl, BackupError> {
    let mut open_left = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.min(1 << 20) as usize / 4)
        .unwrap_or(256);
    let mut captured = CapturedControl::default();
    // Nothing is staged at any control file's place before this: a missing one stays missing.
    for group in control_groups(md, tree)? {
        let Some(src) = group.open(md, warnings)? else { continue };
        for (name, dst) in &group.files {
            let Some(source) = open_control(&src, name, warnings)? else { continue };
            if open_left == 0 {
                write_control(source, tree, dst, reuse)?;
                continue;
            }
            open_left -= 1;
            captured.files.push((source, dst.clone()));
        }
    }
    Ok(captured)
}

impl CapturedControl {
    /// Writes the captured control files into the staged copy (after the locks are let go).
    pub fn write(self, tree: &Tree, reuse: Option<&dyn Reuse>) -> Result<(), BackupError> {
        for (source, dst) in self.files {
            write_control(source, tree, &dst, reuse)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
