//! The backup engine: a bulk copy without any lock, catch-up passes, then a short
//! reconcile under every folder's uidlist lock, so the result equals the mail at one instant.
//!
//! Public: the options, the report, the errors, and the two traits a front end may supply
//! (`Mailboxes`, `Progress`). The phases live here (`Run`); the modules below are internals:
//! `scan` lists a folder, `watch` hears of changes (inotify), `sync` applies listings to the
//! staged copy (`entries` holds a folder's messages, `spill` keeps them on disk meanwhile),
//! `reconcile` takes the locks and the control files.

mod entries;
mod priority;
mod spill;
pub(crate) mod reconcile;
pub(crate) mod scan;
pub(crate) mod sync;
pub(crate) mod watch;

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dotlock::{LockError, LockSettings};
use crate::fsx::{self, Dir, FsError};
use crate::maildir::folders::{self, is_maildir};
use crate::maildir::location::LocationError;
use crate::maildir::uidlist::{self, UidlistError};
use crate::maildir::{Folder, MailLocation, Maildir, MessageName, MESSAGE_DIRS, UIDLIST};
use crate::manifest::{FolderRecord, Header, ManifestError, ManifestWriter, MessageRecord, SourceDirs, EXPUNGED_LIMIT};
use crate::staging::{Staging, StagingError};
use crate::sysexits::{self, ExitCode};

pub use reconcile::{Busy, HeldLocks};
use rayon::prelude::*;
use reconcile::{BUSY_LOCK_WAIT, FIRST_LOCK_WAIT};
pub(crate) use sync::{PassStats, Reuse, Store, Tree};

/// What a repository offers a snapshot: the previous snapshot to reuse, and the store its
/// folders go into. Neither for a plain backup.
#[derive(Clone, Copy, Default)]
pub(crate) struct InRepo<'a> {
    pub reuse: Option<&'a dyn Reuse>,
    pub store: Option<&'a dyn Store>,
}

/// Where a backup's folders come from and how they are locked: walking the Maildir with
/// our own dot-lock (`OnDisk`, the CLI), or Dovecot's mailbox list with Dovecot's lock (the
/// plugin).
pub trait Mailboxes {
    /// The folders as they are now (asked again during the backup).
    fn folders(&self, md: &Maildir, warnings: &mut Vec<String>) -> Result<Vec<Folder>, BackupError>;
    /// One round of locking every folder's uidlist, in the order given, all or none: the first
    /// lock waited for up to `first_wait`, the others only a moment (`NEXT_LOCK_WAIT`). Returns
    /// the locks and when the first was taken, or which folder was busy.
    fn lock_all<'a>(&'a self, md: &Maildir, folders: &[Folder], opts: &BackupOptions, first_wait: Duration, warnings: &mut Vec<String>)
        -> Result<Result<(Box<dyn HeldLocks + 'a>, Instant), Busy>, BackupError>;
}

/// The folders found by walking the Maildir, locked with our own dot-locks.
pub struct OnDisk;

impl Mailboxes for OnDisk {
    fn folders(&self, md: &Maildir, warnings: &mut Vec<String>) -> Result<Vec<Folder>, BackupError> {
        let (found, w) = folders::discover(md)?;
        warnings.extend(w);
        Ok(found)
    }

    fn lock_all<'a>(&'a self, md: &Maildir, folders: &[Folder], opts: &BackupOptions, first_wait: Duration, warnings: &mut Vec<String>)
        -> Result<Result<(Box<dyn HeldLocks + 'a>, Instant), Busy>, BackupError> {
        Ok(reconcile::dotlock_round(md, folders, &opts.lock, first_wait, warnings)?.map(|(set, since)| (Box::new(set) as Box<dyn HeldLocks>, since)))
    }
}

/// Listings that may each find new folders to lock while the locks are held (then all are let
/// go, and another round follows, until the lock timeout).
const MAX_NEW_FOLDER_ROUNDS: u32 = 20;

/// Passes under the locks before giving up on a source that keeps renaming (with a warning).
const MAX_LOCKED_PASSES: u32 = 5;

/// Messages the bulk copy lists before it copies them (and lets go of their listings).
const BULK_BATCH: usize = 20_000;

/// Catch-up passes stop once a pass changes no more than this many messages.
const SMALL_PASS: u64 = 20;
const MAX_CATCH_UP_PASSES: u32 = 4;

/// Messages whose records are written side by side at most (each folder's entries and, in a
/// repository, its previous snapshot's records are read for it): about 30 MB.
const RECORDS_WAVE: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("source {0} is not a Maildir (it has no cur/ directory)")]
    NotMaildir(PathBuf),
    #[error("source {0} does not exist")]
    NoSource(PathBuf),
    #[error("destination {dest} is inside the source {source_dir}; choose a destination outside the Maildir")]
    DestInsideSource { dest: PathBuf, source_dir: PathBuf },
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("reconcile: {0}")]
    Lock(#[from] LockError),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("--link: {dest} is not on the file system (mount) of the source {source_dir}; hard links cannot cross mounts: give a destination beside the Maildir, or copy")]
    LinkAcrossMounts { dest: PathBuf, source_dir: PathBuf },
    #[error("could not lock all folders within the lock timeout of {timeout:.1?} ({rounds} rounds in {waited:.1?}); busy or still changing: {folders}; last: {why}")]
    LockTimeout { timeout: Duration, waited: Duration, rounds: u32, folders: String, why: String },
}

impl ExitCode for BackupError {
    fn exit_code(&self) -> i32 {
        match self {
            BackupError::NotMaildir(_) => sysexits::EX_DATAERR,
            BackupError::NoSource(_) => sysexits::EX_NOINPUT,
            BackupError::DestInsideSource { .. } | BackupError::LinkAcrossMounts { .. } | BackupError::Location(_) => sysexits::EX_USAGE,
            BackupError::Staging(e) => e.exit_code(),
            BackupError::Lock(e) => e.exit_code(),
            BackupError::Io { source, .. } => sysexits::for_io_error(source),
            BackupError::Fs(e) => e.exit_code(),
            BackupError::Manifest(e) => e.exit_code(),
            BackupError::LockTimeout { .. } => sysexits::EX_TEMPFAIL,
        }
    }
}

/// Progress callbacks (the CLI draws a bar; the plugin and tests ignore them).
pub trait Progress: Sync {
    fn phase(&self, _name: &str) {}
    fn total(&self, _messages: u64) {}
    fn advance(&self, _messages: u64, _bytes: u64) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Lock settings for the reconcile; `timeout` bounds the whole wait for all locks.
    pub lock: LockSettings,
    pub jobs: usize,
    /// Also copy Dovecot's index files (best effort: they are not protected by the lock).
    pub with_indexes: bool,
    pub messages: MessageFiles,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions { lock: LockSettings::default(), jobs: 4, with_indexes: false, messages: MessageFiles::Copy }
    }
}

/// How message files get into a backup (control and index files are always copied: Dovecot
/// changes them in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageFiles {
    /// Copied, with their BLAKE3: a backup that survives whatever happens to the source's disk.
    Copy,
    /// Hard-linked to the source's own files, which Dovecot never changes in place (it only
    /// renames and unlinks them): instant, but on the source's file system, sharing its disk.
    /// `checksums` reads every message anyway to record its BLAKE3.
    Link { checksums: bool },
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackupReport {
    pub source: String,
    pub destination: PathBuf,
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Bytes read from the source (the rest were hard-linked from an earlier snapshot).
    pub bytes_copied: u64,
    pub messages_linked: u64,
    /// Folders taken over whole from the previous snapshot (unchanged since it listed them).
    pub folders_taken_over: u64,
    pub lock_hold_ms: f64,
    /// Where the hold went, in the order the work was done under the locks.
    pub lock_hold_phases: HoldPhases,
    pub lock_attempts: u32,
    pub seconds: f64,
    pub passes: u32,
    /// What changed in the source while the backup ran (renames, moves, new, removed).
    pub changed_during_backup: u64,
    /// Unix time of the reconcile instant.
    pub taken_at: i64,
    pub warnings: Vec<String>,
    /// Per folder: name, path in the backup, messages, bytes.
    pub folder_details: Vec<FolderSummary>,
}

/// The lock hold split by what was done under the locks, in milliseconds: taking the rest of
/// the locks after the first, locking folders that appeared meanwhile, the passes that bring
/// the copy to the source, the control files, and letting go.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct HoldPhases {
    pub locking_ms: f64,
    pub new_folders_ms: f64,
    pub passes_ms: f64,
    pub control_files_ms: f64,
    pub release_ms: f64,
}

/// Milliseconds since `t`, and `t` moved to now.
fn lap(t: &mut Instant) -> f64 {
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    *t = Instant::now();
    ms
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FolderSummary {
    pub name: String,
    pub path: String,
    pub messages: u64,
    pub bytes: u64,
}

/// Opens the source Maildir: it must exist and be a Maildir.
pub(crate) fn open_source(loc: &MailLocation) -> Result<Maildir, BackupError> {
    let md = match Maildir::open(loc) {
        Ok(md) => md,
        Err(e) if e.is_not_found() => return Err(BackupError::NoSource(loc.root.clone())),
        Err(e) if e.errno() == Some(libc::ENOTDIR) => return Err(BackupError::NotMaildir(loc.root.clone())),
        Err(e) => return Err(e.into()),
    };
    if !is_maildir(&md.root)? {
        return Err(BackupError::NotMaildir(loc.root.clone()));
    }
    Ok(md)
}

/// Refuses a destination (or repository) `path` inside the source's root, control or index
/// directories, judged by the directories themselves (device and inode), not by their names.
pub(crate) fn check_outside(md: &Maildir, path: &Path) -> Result<(), BackupError> {
    // The nearest directory on the way that exists (DEST itself usually does not).
    let nearest = path.ancestors().find_map(|p| match Dir::open(if p.as_os_str().is_empty() { Path::new(".") } else { p }) {
        Err(e) if e.is_not_found() || e.errno() == Some(libc::ENOTDIR) => None,
        r => Some(r),
    });
    let Some(nearest) = nearest.transpose()? else { return Ok(()) };
    let lineage = nearest.lineage()?;
    let roots = [(Some(&md.root), &md.loc.root), (md.control_root(), md.loc.control.as_ref().unwrap_or(&md.loc.root)), (md.index_root(), md.loc.index.as_ref().unwrap_or(&md.loc.root))];
    for (dir, shown) in roots {
        let Some(dir) = dir else { continue };
        let m = dir.stat()?;
        if lineage.contains(&(m.dev(), m.ino())) {
            return Err(BackupError::DestInsideSource { dest: path.to_path_buf(), source_dir: shown.clone() });
        }
    }
    Ok(())
}

/// Backs up `md` into the new directory `name` in `parent`, published whole or not at all,
/// with the folders and locks of `mailboxes` and earlier copies from `reuse`.
pub(crate) fn backup_to(
    md: &Maildir,
    mailboxes: &dyn Mailboxes,
    parent: &Dir,
    name: &OsStr,
    opts: &BackupOptions,
    repo: InRepo,
    progress: &dyn Progress,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    check_link_mount(md, parent, name, opts)?;
    let staging = Staging::prepare(parent, name)?;
    let mut report = copy_into(md, mailboxes, staging.dir().try_clone()?, opts, repo, progress)?;
    staging.publish()?;
    report.destination = parent.show(name);
    report.seconds = started.elapsed().as_secs_f64(); // the publish's flush included
    Ok(report)
}

/// With `--link`, before anything is written: `parent` must be on the source's mount, or no
/// message could be linked.
fn check_link_mount(md: &Maildir, parent: &Dir, name: &OsStr, opts: &BackupOptions) -> Result<(), BackupError> {
    if opts.messages == MessageFiles::Copy || md.root.mount_id()? == parent.mount_id()? {
        return Ok(());
    }
    Err(BackupError::LinkAcrossMounts { dest: parent.show(name), source_dir: md.root.path().to_path_buf() })
}

/// One backup under way: where from and how, the staged copy, and what the passes did.
struct Run<'a> {
    md: &'a Maildir,
    mailboxes: &'a dyn Mailboxes,
    opts: &'a BackupOptions,
    reuse: Option<&'a dyn Reuse>,
    store: Option<&'a dyn Store>,
    progress: &'a dyn Progress,
    pool: rayon::ThreadPool,
    tree: Tree,
    /// inotify on every folder's cur/ and new/ (None on NFS, where it sees nothing of other
    /// clients, or where inotify is not available).
    watcher: Option<watch::Watcher>,
    total: PassStats,
    passes: u32,
    changed: u64,
    lock_attempts: u32,
}

/// The folders whose locks kept a round from completing, and how often.
#[derive(Default)]
struct Unsettled {
    rounds: u32,
    by_folder: BTreeMap<String, u32>,
    last_why: String,
}

impl Unsettled {
    fn note(&mut self, busy: Busy) {
        self.rounds += 1;
        *self.by_folder.entry(busy.folder).or_default() += 1;
        self.last_why = busy.why;
    }

    /// The exit-75 error: which folders kept a round from completing, the most often first.
    fn into_error(self, timeout: Duration, waited: Duration) -> BackupError {
        let mut counts: Vec<(String, u32)> = self.by_folder.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let shown: Vec<String> = counts.iter().take(10).map(|(f, n)| format!("{f} ({n}×)")).collect();
        let more = counts.len().saturating_sub(shown.len());
        let folders = if more > 0 { format!("{} and {more} more", shown.join(", ")) } else { shown.join(", ") };
        BackupError::LockTimeout { timeout, waited, rounds: self.rounds, folders, why: self.last_why }
    }
}

/// The locks of a round that took them all: the folders they cover, when the first was taken,
/// and the time spent under them so far.
struct Held<'a> {
    locks: Box<dyn HeldLocks + 'a>,
    folders: Vec<Folder>,
    since: Instant,
    phases: HoldPhases,
}

/// What the locked reconcile took: when, and for how long the locks were held.
struct Reconciled {
    taken_at: i64,
    held: Duration,
    phases: HoldPhases,
}

impl<'a> Run<'a> {
    /// The folders as they are now (their warnings recorded).
    fn discover(&mut self) -> Result<Vec<Folder>, BackupError> {
        let mut warnings = Vec::new();
        let found = self.mailboxes.folders(self.md, &mut warnings)?;
        self.tree.warn_all(warnings);
        Ok(found)
    }

    /// Applies listings to the staged copy and counts what they changed.
    fn apply(&mut self, listings: Vec<(Folder, Option<scan::Listing>)>) -> Result<PassStats, BackupError> {
        let s = self.tree.apply(self.md, listings, &self.pool, self.reuse, self.progress)?;
        self.passes += 1;
        self.total.add(&s);
        Ok(s)
    }

    /// Lists the folders that may have changed since their last listing, and applies that.
    fn relist_and_apply(&mut self, folders: &[Folder]) -> Result<PassStats, BackupError> {
        let listings = reconcile::relist(self.md, &mut self.tree, folders, self.opts.lock.nfs_flush, self.watcher.as_mut())?;
        let s = self.apply(listings)?;
        self.changed += s.changes();
        Ok(s)
    }

    /// Everything, without any lock: each folder watched, then listed in full, then copied, a
    /// few folders at a time (`BULK_BATCH` messages), so that only their listings are held at
    /// once; then their entries go to the scratch file. The progress total grows as folders are
    /// listed.
    fn bulk(&mut self) -> Result<(), BackupError> {
        self.progress.phase("copying");
        let found = self.discover()?;
        let (mut batch, mut in_batch, mut listed) = (Vec::new(), 0, 0);
        for (i, f) in found.iter().enumerate() {
            if !self.take_over(f)? {
                // Before the first listing: what the previous snapshot's records take while
                // they are read is let go before listings and copies take theirs.
                if let Some(reuse) = self.reuse {
                    reuse.read_ahead();
                }
                let listing = reconcile::watch_and_list(self.md, f, self.watcher.as_mut())?;
                let n = listing.as_ref().map_or(0, |l| l.entries.len());
                (in_batch, listed) = (in_batch + n, listed + n as u64);
                self.progress.total(listed);
                batch.push((f.clone(), listing));
            }
            if in_batch >= BULK_BATCH || batch.len() >= sync::FOLDERS_PER_BATCH || (i + 1 == found.len() && !batch.is_empty()) {
                let rels: Vec<PathBuf> = batch.iter().map(|(f, _)| f.rel.clone()).collect();
                let s = self.tree.apply(self.md, std::mem::take(&mut batch), &self.pool, self.reuse, self.progress)?;
                self.total.add(&s);
                self.tree.spill_folders(&rels)?;
                in_batch = 0;
            }
        }
        self.passes += 1;
        Ok(())
    }

    /// Takes folder `f` over whole from the previous snapshot if its directories have not
    /// changed since that snapshot listed them (never on NFS, where directory times are
    /// cached). It is not watched: each pass compares its directories' stamps, and lists it
    /// in full once they change.
    fn take_over(&mut self, f: &Folder) -> Result<bool, BackupError> {
        let Some(reuse) = self.reuse.filter(|_| !self.opts.lock.nfs_flush) else { return Ok(false) };
        let now = scan::dir_stamps(self.md, f);
        self.tree.take_over(f, now, reuse)
    }

    /// What changed meanwhile, still without a lock, until a pass finds little: so the locked
    /// pass is short.
    fn catch_up(&mut self) -> Result<(), BackupError> {
        for _ in 0..MAX_CATCH_UP_PASSES {
            let found = self.discover()?;
            if self.relist_and_apply(&found)?.changes() <= SMALL_PASS {
                break;
            }
        }
        Ok(())
    }

    /// Catches up, takes every folder's lock, brings the copy to exactly what the source holds
    /// at that instant, opens the control files, lets go, copies what was only opened. A round
    /// that finds a lock busy lets go of all; that lock is waited for holding none, and tried
    /// first in the next round (after another catch-up), until the lock timeout.
    fn reconcile(&mut self) -> Result<Reconciled, BackupError> {
        let started = Instant::now();
        let mut unsettled = Unsettled::default();
        let mut first = None;
        loop {
            self.catch_up()?;
            self.progress.phase("reconciling");
            let raised = priority::Raised::new(&self.pool);
            let busy = match self.lock_round(first.take())? {
                Ok(held) => return self.settle_and_let_go(held, raised),
                Err(busy) => busy,
            };
            drop(raised);
            let left = self.opts.lock.timeout.saturating_sub(started.elapsed());
            let folder = busy.folder.clone();
            unsettled.note(busy);
            if left.is_zero() {
                return Err(unsettled.into_error(self.opts.lock.timeout, started.elapsed()));
            }
            std::thread::sleep(reconcile::jitter(unsettled.rounds).min(left));
            self.wait_until_free(&folder, BUSY_LOCK_WAIT.min(self.opts.lock.timeout.saturating_sub(started.elapsed())))?;
            first = Some(folder);
        }
    }

    /// One round: every folder's lock, the one named `first` (busy last round) first, then
    /// those of folders that appeared meanwhile; or which folder was busy (all let go).
    fn lock_round(&mut self, first: Option<String>) -> Result<Result<Held<'a>, Busy>, BackupError> {
        let mut found = self.discover()?;
        if let Some(pos) = first.and_then(|name| found.iter().position(|f| f.name == name)) {
            let f = found.remove(pos);
            found.insert(0, f);
        }
        self.lock_attempts += 1;
        let mut w = Vec::new();
        let taken = self.mailboxes.lock_all(self.md, &found, self.opts, FIRST_LOCK_WAIT, &mut w)?;
        self.tree.warn_all(w);
        let (mut locks, since) = match taken {
            Ok(taken) => taken,
            Err(busy) => return Ok(Err(busy)),
        };
        let mut phases = HoldPhases::default();
        let mut t = since;
        phases.locking_ms = lap(&mut t);
        let (folders, busy) = self.lock_new_folders(locks.as_mut(), found)?;
        phases.new_folders_ms = lap(&mut t);
        if let Some(busy) = busy {
            let mut w = Vec::new();
            locks.release(&mut w);
            self.tree.warn_all(w);
            return Ok(Err(busy));
        }
        Ok(Ok(Held { locks, folders, since, phases }))
    }

    /// Waits up to `wait` for `folder`'s lock to be let go, holding no other (taking it and
    /// letting go at once).
    fn wait_until_free(&mut self, folder: &str, wait: Duration) -> Result<(), BackupError> {
        let Some(f) = self.tree.folders.values().map(|s| &s.folder).find(|f| f.name == folder).cloned() else { return Ok(()) };
        let mut w = Vec::new();
        if let Ok((locks, _)) = self.mailboxes.lock_all(self.md, &[f], self.opts, wait, &mut w)? {
            locks.release(&mut w);
        }
        self.tree.warn_all(w);
        Ok(())
    }

    /// Under the locks of `held` (at the `raised` priority): the passes and the control files
    /// (see `settle`); then lets go and copies what was only opened under them.
    fn settle_and_let_go(&mut self, held: Held<'a>, raised: priority::Raised) -> Result<Reconciled, BackupError> {
        let Held { locks, folders, since, mut phases } = held;
        let mut w = Vec::new();
        self.tree.defer_copies(true);
        let result = self.settle(&folders, locks.as_ref(), &mut phases, &mut w);
        let mut t = Instant::now();
        locks.release(&mut w);
        phases.release_ms = lap(&mut t);
        let held = since.elapsed();
        drop(raised);
        self.tree.defer_copies(false);
        self.tree.warn_all(w);
        let (taken_at, control) = result?;
        control.write(&self.tree, self.reuse)?;
        self.total.add(&self.tree.copy_deferred(&self.pool, self.progress)?);
        Ok(Reconciled { taken_at, held, phases })
    }

    /// Lists the folders again and locks any that appeared since `locked` were locked (one at
    /// a time, holding the others), until a listing finds no new one. Returns the folders now
    /// locked, and which new one could not be locked (then all are let go).
    fn lock_new_folders(&mut self, locks: &mut dyn HeldLocks, mut locked: Vec<Folder>) -> Result<(Vec<Folder>, Option<Busy>), BackupError> {
        let mut more = Vec::new();
        for _ in 0..MAX_NEW_FOLDER_ROUNDS {
            let now_found = self.discover()?;
            more = now_found.iter().filter(|f| !locked.contains(f)).cloned().collect();
            if more.is_empty() {
                return Ok((now_found, None));
            }
            let mut w = Vec::new();
            let added = locks.add(self.md, &more, self.opts, &mut w)?;
            self.tree.warn_all(w);
            if let Err(busy) = added {
                return Ok((now_found, Some(busy)));
            }
            locked.extend(more.iter().cloned());
        }
        let names: Vec<&str> = more.iter().map(|f| f.name.as_str()).collect();
        let why = format!("folders were still being created after {MAX_NEW_FOLDER_ROUNDS} listings");
        Ok((locked, Some(Busy { folder: names.join(", "), why })))
    }

    /// Under the locks: looks again until a pass finds nothing more (a name that vanished
    /// between listing and copying, or was missed by a stat or a readdir racing a rename,
    /// Dovecot's rare renames without the lock, shows up in the next pass through inotify or
    /// the directory times; never a full rescan of everything), then opens the control files.
    /// Returns the instant the backup stands for, and the control files to write once the
    /// locks are let go.
    fn settle(
        &mut self,
        folders: &[Folder],
        locks: &dyn HeldLocks,
        phases: &mut HoldPhases,
        w: &mut Vec<String>,
    ) -> Result<(i64, reconcile::CapturedControl), BackupError> {
        let mut t = Instant::now();
        let mut settled = false;
        for _ in 0..MAX_LOCKED_PASSES {
            let s = self.relist_and_apply(folders)?;
            locks.touch();
            if s.vanished == 0 && s.removed == 0 {
                settled = true;
                break;
            }
        }
        if !settled {
            w.push("the source kept renaming messages during the reconcile; a message renamed in its last moment may be missing".to_string());
        }
        phases.passes_ms = lap(&mut t);
        let taken_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let captured = reconcile::capture_control_files(self.md, &self.tree, self.reuse, w)?;
        phases.control_files_ms = lap(&mut t);
        Ok((taken_at, captured))
    }

    /// Index files (if asked), the manifest, the directories' metadata; the report.
    fn finish(self, started: Instant, r: Reconciled) -> Result<BackupReport, BackupError> {
        let (md, tree) = (self.md, &self.tree);
        if self.opts.with_indexes {
            copy_indexes(md, tree);
        }
        self.progress.phase("finishing");
        finish_message_dirs(md, tree)?;
        if let Some(reuse) = self.reuse {
            reuse.done_linking();
        }
        let records = self.pool.install(|| folder_records(md, tree, self.reuse, self.store))?;
        let header = write_manifest(md, tree, &records, r.taken_at, r.held, self.total.bytes)?;
        // Last: anything written into a directory after this would change its mtime again.
        finish_dirs(md, tree)?;
        let folder_details = records
            .iter()
            .map(|f| FolderSummary { name: f.name.clone(), path: f.path.clone(), messages: f.messages, bytes: f.bytes.unwrap_or_else(|| folder_bytes(tree, &f.path)) })
            .collect();
        Ok(BackupReport {
            source: md.loc.to_mail_location(),
            destination: tree.staging.path().to_path_buf(),
            folders: header.folders,
            messages: header.messages,
            bytes: header.bytes,
            bytes_copied: self.total.bytes,
            messages_linked: self.total.linked,
            folders_taken_over: tree.folders.values().filter(|s| s.taken_over.is_some()).count() as u64,
            lock_hold_ms: r.held.as_secs_f64() * 1000.0,
            lock_hold_phases: r.phases,
            lock_attempts: self.lock_attempts,
            seconds: started.elapsed().as_secs_f64(),
            passes: self.passes,
            changed_during_backup: self.changed,
            taken_at: r.taken_at,
            warnings: tree.warnings(),
            folder_details,
        })
    }
}

/// Copies `md` into the (existing, empty) directory `out`, including the manifest.
/// `reuse` offers earlier copies to hard-link instead of reading the source.
fn copy_into(
    md: &Maildir,
    mailboxes: &dyn Mailboxes,
    out: Dir,
    opts: &BackupOptions,
    repo: InRepo,
    progress: &dyn Progress,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .build()
        .map_err(|e| BackupError::Io { op: "start copy threads", path: out.path().to_path_buf(), source: io::Error::other(e) })?;
    let mut run = Run {
        md,
        mailboxes,
        opts,
        reuse: repo.reuse,
        store: repo.store,
        progress,
        pool,
        tree: Tree::new(out, fsx::running_as_root()).with_messages(opts.messages),
        watcher: if opts.lock.nfs_flush { None } else { watch::Watcher::new() },
        total: PassStats::default(),
        passes: 0,
        changed: 0,
        lock_attempts: 0,
    };
    run.bulk()?;
    let reconciled = run.reconcile()?;
    run.finish(started, reconciled)
}

/// Best effort: index files are not protected by the uidlist lock, and Dovecot rebuilds
/// them from the Maildir if they disagree.
fn copy_indexes(md: &Maildir, tree: &Tree) {
    let wanted = |n: &str| n.starts_with("dovecot.index") || n.starts_with("dovecot.list.index");
    let mut dirs: Vec<(Option<Dir>, PathBuf)> = tree.folders.iter().map(|(rel, s)| (md.index_dir(&s.folder).ok().flatten(), rel.clone())).collect();
    dirs.push((md.index_root().and_then(|d| d.try_clone().ok()), PathBuf::new()));
    for (from, to) in dirs {
        let (Some(from), Ok(to)) = (from, tree.staging.sub(&to)) else { continue };
        for e in from.list().unwrap_or_default() {
            let Some(name) = e.name.to_str().filter(|n| wanted(n)) else { continue };
            // Only regular files with one name (see reconcile::open_control), never over
            // anything, never through a symlink.
            let Ok(mut input) = from.open_read(name) else { continue };
            if input.meta.nlink() > 1 {
                continue;
            }
            let Ok(out) = to.create(name, 0o600) else { continue };
            let owner = tree.keep_owner.then(|| input.meta.owner());
            if fsx::copy_file(&mut input, &out, owner).is_err() {
                let _ = to.unlink(name);
            }
        }
    }
}

/// Gives the staged cur/, new/ and tmp/ of every folder the source's mode and times (never
/// write access for group or others, and never the source's owner: a backup made by root
/// stays root's); a taken-over folder's cur/ and new/ are the previous snapshot's, as they were.
fn finish_message_dirs(md: &Maildir, tree: &Tree) -> Result<(), BackupError> {
    for (rel, state) in &tree.folders {
        let subs: &[&str] = if state.taken_over.is_some() { &["tmp"] } else { &MESSAGE_DIRS };
        for sub in subs {
            copy_dir_meta(md, tree, &rel.join(sub))?;
        }
    }
    Ok(())
}

/// Gives every staged folder directory (and LAYOUT=fs parent) the source's mode and times, as
/// `finish_message_dirs`. Done last: writing into a directory changes its mtime.
fn finish_dirs(md: &Maildir, tree: &Tree) -> Result<(), BackupError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for rel in tree.folders.keys() {
        dirs.push(rel.clone());
        // LAYOUT=fs parents that are not folders themselves.
        dirs.extend(rel.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf));
    }
    // Deepest first, so setting a child's times does not disturb its parent's afterwards.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for rel in dirs {
        copy_dir_meta(md, tree, &rel)?;
    }
    // The backup's top directory is nobody's business but its maker's, whatever the source
    // allowed: no way in for the mail user, whose files inside keep their owner.
    let top = tree.staging.stat()?;
    tree.staging.set_mode(top.mode() & 0o700)?;
    Ok(())
}

/// The source directory `rel`'s mode and times onto its staged copy (kept as made if the
/// source's is gone or replaced meanwhile).
fn copy_dir_meta(md: &Maildir, tree: &Tree, rel: &Path) -> Result<(), BackupError> {
    let source = match md.root.lstat(rel) {
        Ok(Some(m)) if m.is_dir() => m,
        Err(e) if !e.is_planted() => return Err(e.into()),
        _ => return Ok(()),
    };
    tree.staging.sub(rel)?.copy_dir_meta(&source)?;
    Ok(())
}

fn folder_bytes(tree: &Tree, path: &str) -> u64 {
    tree.folders.get(Path::new(path)).map_or(0, sync::FolderState::bytes)
}

/// Each folder's record: a taken-over folder's as the previous snapshot has it (its uidlist
/// described anew if that changed); in a repository, a listed folder's messages moved into a
/// new store entry with their records; in a plain backup, a listed folder's records stay in
/// the tree for the manifest.
fn folder_records(md: &Maildir, tree: &Tree, reuse: Option<&dyn Reuse>, store: Option<&dyn Store>) -> Result<Vec<FolderRecord>, BackupError> {
    let linked = tree.linked_control.lock().unwrap_or_else(|p| p.into_inner());
    let folders: Vec<_> = tree.folders.iter().collect();
    let mut records = Vec::with_capacity(folders.len());
    // Folder by folder, side by side: each reads and writes its own records and entry. In
    // waves, so that only so many messages' entries and base records are read at once.
    for wave in waves(&folders, |(_, s)| s.taken_over.as_ref().map_or(s.messages(), |r| r.messages), RECORDS_WAVE) {
        let done: Result<Vec<_>, _> = wave.par_iter().map(|(rel, state)| folder_record(md, tree, rel, state, &linked, reuse, store)).collect();
        records.extend(done?);
    }
    Ok(records)
}

/// `items` cut in order into runs of at most `most` by `weight` (one heavier alone).
fn waves<T>(items: &[T], weight: impl Fn(&T) -> u64, most: u64) -> Vec<&[T]> {
    let (mut out, mut start, mut sum) = (Vec::new(), 0, 0);
    for (i, item) in items.iter().enumerate() {
        let w = weight(item);
        if i > start && sum + w > most {
            out.push(&items[start..i]);
            (start, sum) = (i, 0);
        }
        sum += w;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

fn folder_record(md: &Maildir, tree: &Tree, rel: &Path, state: &sync::FolderState, linked: &HashSet<PathBuf>, reuse: Option<&dyn Reuse>, store: Option<&dyn Store>) -> Result<FolderRecord, BackupError> {
    let path = rel.to_string_lossy().into_owned();
    let fdir = tree.staging.sub(rel)?;
    if let (Some(old), Some(reuse)) = (&state.taken_over, reuse) {
        let mut record = FolderRecord { path, name: state.folder.name.clone(), ..old.clone() };
        let uidlist_same = linked.contains(&rel.join(UIDLIST)) || (old.uidlist_header.is_none() && fdir.lstat(UIDLIST)?.is_none());
        if !uidlist_same {
            let uniques = reuse.stored_uniques(old.store.as_deref().unwrap_or_default())?;
            let u = summarize_uidlist(&fdir, &|unique| uniques.contains(unique))?;
            (record.uidlist_header, record.uidlist_expunged, record.uidlist_expunged_partial) = (u.header, u.expunged, u.partial);
        }
        return Ok(record);
    }
    // The unique names by a keyed hash: 8 bytes a message, not 60. Two of one hash would at
    // worst leave an expunged message out of the uidlist's description.
    let hasher = RandomState::new();
    let mut uniques = HashSet::with_capacity(state.messages() as usize);
    for e in tree.sorted_entries(state) {
        uniques.extend(MessageName::parse(&e?.name).map(|n| hasher.hash_one(n.unique())));
    }
    let uidlist = summarize_uidlist(&fdir, &|unique| uniques.contains(&hasher.hash_one(unique)))?;
    drop(uniques);
    let mut record = FolderRecord {
        uidlist_header: uidlist.header,
        uidlist_expunged: uidlist.expunged,
        uidlist_expunged_partial: uidlist.partial,
        messages: state.messages(),
        ..FolderRecord::new(path, state.folder.name.clone())
    };
    if let Some(store) = store {
        record.bytes = Some(state.bytes());
        record.source_dirs = source_dirs(md, state);
        let (path, failed) = (record.path.clone(), Cell::new(None));
        let records = || -> Box<dyn Iterator<Item = MessageRecord>> { Box::new(message_records(tree, &path, state, &failed)) };
        let id = store.store_folder(&record.path, &fdir, &records);
        if let Some(e) = failed.take() {
            return Err(e);
        }
        record.store = Some(id?);
    }
    Ok(record)
}

/// The stamps a folder was listed with, if its directories still have them: what the next
/// snapshot compares to take it over.
fn source_dirs(md: &Maildir, state: &sync::FolderState) -> Option<SourceDirs> {
    let [Some(cur), Some(new)] = state.stamps else { return None };
    let listed_at_ns = i64::try_from(state.listed_at?.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()?;
    (scan::dir_stamps(md, &state.folder) == state.stamps).then_some(SourceDirs { cur, new, listed_at_ns })
}

/// A listed folder's message records, sorted by place and name (see `Tree::sorted_entries`).
/// A read that fails ends them, and is left in `failed` for the caller.
fn message_records<'s>(tree: &'s Tree, folder: &'s str, state: &'s sync::FolderState, failed: &'s Cell<Option<BackupError>>) -> impl Iterator<Item = MessageRecord> + 's {
    tree.sorted_entries(state).map_while(move |e| match e {
        Ok(e) => Some(message_record(folder, &e)),
        Err(e) => {
            failed.set(Some(e));
            None
        }
    })
}

fn message_record(folder: &str, e: &sync::Entry) -> MessageRecord {
    let name = MessageName::parse(&e.name);
    MessageRecord {
        folder: folder.to_string(),
        dir: e.sub,
        name: e.name.to_string(),
        unique: name.map(|n| n.unique().to_string()).unwrap_or_default(),
        flags: name.map(|n| n.flags().to_string()).unwrap_or_default(),
        size: e.size,
        blake3: sync::hex(e.blake3),
    }
}

/// Writes the backup's manifest: the header, `folders`' records, then the message records of
/// the folders not in the store, one at a time (never all of them in memory at once); returns
/// its header.
fn write_manifest(md: &Maildir, tree: &Tree, folders: &[FolderRecord], taken_at: i64, held: Duration, bytes_copied: u64) -> Result<Header, BackupError> {
    let owner = fsx::running_as_root().then(|| md.root.stat().map(|m| m.owner())).transpose()?;
    let stored = folders.iter().any(|f| f.store.is_some());
    let header = Header {
        format: if stored { crate::manifest::FORMAT_STORE } else { crate::manifest::FORMAT },
        tool: format!("maildir-backup {}", env!("CARGO_PKG_VERSION")),
        source: md.loc.to_mail_location(),
        layout: md.loc.layout,
        taken_at,
        lock_hold_ms: held.as_millis() as u64,
        folders: folders.len() as u64,
        messages: folders.iter().map(|f| f.messages).sum(),
        bytes: folders.iter().map(|f| f.bytes.unwrap_or_else(|| folder_bytes(tree, &f.path))).sum(),
        bytes_copied,
        owner,
    };
    let mut w = ManifestWriter::create(&tree.staging, &header)?;
    folders.iter().try_for_each(|f| w.folder(f))?;
    for (f, state) in folders.iter().zip(tree.folders.values()).filter(|(f, _)| f.store.is_none()) {
        for e in tree.sorted_entries(state) {
            let e = e?;
            w.message(&message_record(&f.path, &e))?;
        }
    }
    w.finish()?;
    Ok(header)
}

/// What the staged uidlist says beyond the files: its header, and the unique names it lists
/// that have no file (messages Dovecot expunged and has not yet dropped from its uidlist),
/// cut short past `EXPUNGED_LIMIT` bytes. Read as a stream.
struct UidlistSummary {
    header: Option<String>,
    expunged: Vec<String>,
    partial: bool,
}

fn summarize_uidlist(dir: &Dir, has_file: &dyn Fn(&str) -> bool) -> Result<UidlistSummary, BackupError> {
    let mut sum = UidlistSummary { header: None, expunged: Vec::new(), partial: false };
    let reader = match uidlist::Reader::open(dir) {
        Ok(Some(r)) => r,
        // Unreadable as a uidlist: carried as it is, described by nothing.
        Ok(None) | Err(UidlistError::Syntax { .. }) => return Ok(sum),
        Err(UidlistError::Fs(e)) => return Err(e.into()),
    };
    sum.header = Some(reader.header.line.clone());
    let mut bytes = 0;
    for entry in reader {
        match entry {
            Ok(e) if !has_file(&e.unique) => {
                bytes += e.unique.len();
                if bytes > EXPUNGED_LIMIT {
                    sum.partial = true;
                    break;
                }
                sum.expunged.push(e.unique);
            }
            Ok(_) => {}
            Err(UidlistError::Syntax { .. }) => break,
            Err(UidlistError::Fs(e)) => return Err(e.into()),
        }
    }
    sum.expunged.sort();
    Ok(sum)
}

#[cfg(test)]
mod tests;
