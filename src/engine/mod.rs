//! The backup engine: a bulk copy without any lock, catch-up passes, then a short
//! reconcile under every folder's uidlist lock, so the result equals the mail at one instant.

pub mod copy;
pub mod reconcile;
pub mod scan;
pub mod sync;
pub mod watch;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dotlock::{LockError, LockSettings};
use crate::maildir::folders::{self, FolderError};
use crate::maildir::location::LocationError;
use crate::maildir::uidlist::Uidlist;
use crate::maildir::{Folder, MailLocation, MessageName, UIDLIST};
use crate::manifest::{FolderRecord, Header, Manifest, ManifestError, MessageRecord, MANIFEST_NAME};
use crate::staging::{Staging, StagingError};
use crate::sysexits::{self, ExitCode};

pub use reconcile::HeldLocks;
pub use sync::{PassStats, Reuse, Tree};

/// Where a backup's folders come from and how they are locked: walking the Maildir with
/// our own dot-lock (the CLI), or Dovecot's mailbox list with Dovecot's lock (the plugin).
pub trait Mailboxes {
    /// The folders as they are now (asked again during the backup).
    fn folders(&self, warnings: &mut Vec<String>) -> Result<Vec<Folder>, BackupError>;
    /// Locks every folder's uidlist, all or none; returns when the successful round began.
    fn lock_all<'a>(&'a self, folders: &[Folder], opts: &BackupOptions, attempts: &mut u32)
        -> Result<(Box<dyn HeldLocks + 'a>, Instant), BackupError>;
}

impl Mailboxes for MailLocation {
    fn folders(&self, warnings: &mut Vec<String>) -> Result<Vec<Folder>, BackupError> {
        let (found, w) = folders::discover(self)?;
        warnings.extend(w);
        Ok(found)
    }

    fn lock_all<'a>(&'a self, folders: &[Folder], opts: &BackupOptions, attempts: &mut u32)
        -> Result<(Box<dyn HeldLocks + 'a>, Instant), BackupError> {
        let (set, since) = reconcile::dotlock_all(folders, &opts.lock, attempts)?;
        Ok((Box::new(set), since))
    }
}

/// Catch-up passes stop once a pass changes no more than this many messages.
const SMALL_PASS: u64 = 20;
const MAX_CATCH_UP_PASSES: u32 = 4;

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
    Scan(#[from] scan::ScanError),
    #[error(transparent)]
    Folders(#[from] FolderError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("could not lock all folders within {waited:.1?} ({attempts} attempts); last busy: {why}")]
    LockTimeout { waited: Duration, attempts: u32, why: String },
    #[error("the source kept changing: folders were still being created after {0} attempts to lock them all")]
    Unstable(u32),
}

impl ExitCode for BackupError {
    fn exit_code(&self) -> i32 {
        match self {
            BackupError::NotMaildir(_) => sysexits::EX_DATAERR,
            BackupError::NoSource(_) => sysexits::EX_NOINPUT,
            BackupError::DestInsideSource { .. } | BackupError::Location(_) => sysexits::EX_USAGE,
            BackupError::Staging(StagingError::DestExists(_)) => sysexits::EX_CANTCREAT,
            BackupError::Staging(StagingError::Busy { .. }) => sysexits::EX_TEMPFAIL,
            BackupError::Staging(StagingError::BadDest(_)) => sysexits::EX_USAGE,
            BackupError::Staging(StagingError::Io { source, .. }) => sysexits::for_io_error(source),
            BackupError::Staging(StagingError::Lock(e)) | BackupError::Lock(e) => e.exit_code(),
            BackupError::Io { source, .. } => sysexits::for_io_error(source),
            BackupError::Scan(scan::ScanError::Io { source, .. }) => sysexits::for_io_error(source),
            BackupError::Scan(scan::ScanError::NonUtf8(_)) => sysexits::EX_DATAERR,
            BackupError::Folders(e) => sysexits::for_io_error(&e.source),
            BackupError::Manifest(crate::manifest::ManifestError::Io { source, .. }) => sysexits::for_io_error(source),
            BackupError::Manifest(crate::manifest::ManifestError::Bad { .. }) => sysexits::EX_DATAERR,
            BackupError::Unstable(_) | BackupError::LockTimeout { .. } => sysexits::EX_TEMPFAIL,
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
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions { lock: LockSettings::default(), jobs: 4, with_indexes: false }
    }
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
    pub lock_hold_ms: f64,
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

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FolderSummary {
    pub name: String,
    pub path: String,
    pub messages: u64,
    pub bytes: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackupError + 'a {
    move |source| BackupError::Io { op, path: path.to_path_buf(), source }
}

/// `path` with its longest existing prefix resolved (symlinks followed), the rest appended:
/// where it would be, even if it does not exist yet.
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(real) = fs::canonicalize(cur) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Checks that `source` is a Maildir and `dest` is not inside it.
pub fn check_paths(source: &MailLocation, dest: &Path) -> Result<(), BackupError> {
    match fs::metadata(&source.root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BackupError::NoSource(source.root.clone())),
        Err(e) => return Err(io_err("stat source", &source.root)(e)),
        Ok(_) => {}
    }
    if !folders::is_maildir(&source.root) {
        return Err(BackupError::NotMaildir(source.root.clone()));
    }
    let dest_abs = resolve_existing_prefix(dest);
    for dir in [Some(&source.root), source.control.as_ref(), source.index.as_ref()].into_iter().flatten() {
        if let Ok(src_abs) = fs::canonicalize(dir) {
            if dest_abs.starts_with(&src_abs) {
                return Err(BackupError::DestInsideSource { dest: dest.to_path_buf(), source_dir: dir.clone() });
            }
        }
    }
    Ok(())
}

/// Backs up `source` into the new directory `dest`, published whole or not at all.
pub fn backup(source: &MailLocation, dest: &Path, opts: &BackupOptions, progress: &dyn Progress) -> Result<BackupReport, BackupError> {
    backup_with(source, source, dest, opts, None, progress)
}

/// `backup` with the folders and locks of `mailboxes`, and earlier copies from `reuse`.
pub fn backup_with(
    source: &MailLocation,
    mailboxes: &dyn Mailboxes,
    dest: &Path,
    opts: &BackupOptions,
    reuse: Option<&dyn Reuse>,
    progress: &dyn Progress,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    check_paths(source, dest)?;
    let staging = Staging::prepare(dest)?;
    let mut report = copy_into(source, mailboxes, staging.path(), opts, reuse, progress)?;
    staging.publish()?;
    report.destination = dest.to_path_buf();
    report.seconds = started.elapsed().as_secs_f64(); // the publish's flush included
    Ok(report)
}

fn discover(mailboxes: &dyn Mailboxes, tree: &mut Tree) -> Result<Vec<Folder>, BackupError> {
    let mut warnings = Vec::new();
    let found = mailboxes.folders(&mut warnings)?;
    for w in warnings {
        tree.warn(&w);
    }
    Ok(found)
}

/// Copies `source` into the (existing, empty) directory `out`, including the manifest.
/// `reuse` offers earlier copies to hard-link instead of reading the source.
pub fn copy_into(
    source: &MailLocation,
    mailboxes: &dyn Mailboxes,
    out: &Path,
    opts: &BackupOptions,
    reuse: Option<&dyn Reuse>,
    progress: &dyn Progress,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let keep_owner = copy::running_as_root();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .build()
        .map_err(|e| BackupError::Io { op: "start copy threads", path: out.to_path_buf(), source: io::Error::other(e) })?;
    let mut tree = Tree::new(out.to_path_buf(), keep_owner);
    let nfs = opts.lock.nfs_flush;
    // inotify cannot see changes made by other NFS clients.
    let mut watcher = if nfs { None } else { watch::Watcher::new() };

    // Bulk: everything, no lock.
    progress.phase("copying");
    let found = discover(mailboxes, &mut tree)?;
    let mut listings = Vec::with_capacity(found.len());
    for f in &found {
        listings.push((f.clone(), reconcile::watch_and_list(f, watcher.as_mut())?));
    }
    progress.total(listings.iter().filter_map(|(_, l)| l.as_ref()).map(|l| l.entries.len() as u64).sum());
    let mut total = tree.apply(listings, &pool, reuse, progress)?;
    let mut passes = 1;
    let mut changed = 0u64;

    // Catch up on what changed meanwhile, still without a lock, so the locked pass is short.
    let mut attempts = 0u32;
    let mut lock_rounds = 0u32;
    let (held, taken_at) = loop {
        for _ in 0..MAX_CATCH_UP_PASSES {
            let found = discover(mailboxes, &mut tree)?;
            let listings = reconcile::relist(&tree, &found, nfs, false, watcher.as_mut())?;
            let s = tree.apply(listings, &pool, reuse, progress)?;
            passes += 1;
            changed += s.changes();
            total.add(&s);
            if s.changes() <= SMALL_PASS {
                break;
            }
        }

        progress.phase("reconciling");
        let control = reconcile::precopy_control_files(&tree, source.control_root())?;
        let found = discover(mailboxes, &mut tree)?;
        let (locks, since) = mailboxes.lock_all(&found, opts, &mut attempts)?;
        lock_rounds += 1;
        // A folder created after we listed the folders is not locked: start over.
        let now_found = discover(mailboxes, &mut tree)?;
        if now_found.iter().any(|f| !found.contains(f)) {
            let mut w = Vec::new();
            locks.release(&mut w);
            for x in w {
                tree.warn(&x);
            }
            if lock_rounds >= 10 {
                return Err(BackupError::Unstable(lock_rounds));
            }
            continue;
        }
        let result = (|| -> Result<i64, BackupError> {
            // Look again until a pass finds nothing more: a name that vanished between listing
            // and copying, or was missed by a stat or a readdir racing a rename (Dovecot's rare
            // renames without the lock), shows up in the next pass through inotify or the
            // directory times; never a full rescan of everything under the lock.
            let mut settled = false;
            for _ in 0..5 {
                let listings = reconcile::relist(&tree, &now_found, nfs, false, watcher.as_mut())?;
                let s = tree.apply(listings, &pool, reuse, progress)?;
                locks.touch();
                passes += 1;
                changed += s.changes();
                total.add(&s);
                if s.vanished == 0 && s.removed == 0 {
                    settled = true;
                    break;
                }
            }
            if !settled {
                tree.warn("the source kept renaming messages during the reconcile; a message renamed in its last moment may be missing");
            }
            let taken_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
            reconcile::copy_control_files(&tree, source.control_root(), control)?;
            Ok(taken_at)
        })();
        let mut w = Vec::new();
        locks.release(&mut w);
        let held = since.elapsed();
        for x in w {
            tree.warn(&x);
        }
        break (held, result?);
    };

    if opts.with_indexes {
        copy_indexes(source, &tree);
    }
    progress.phase("finishing");
    let manifest = build_manifest(source, &tree, taken_at, held, total.bytes)?;
    manifest.write(&out.join(MANIFEST_NAME))?;
    // Last: anything written into a directory after this would change its mtime again.
    finish_dirs(source, &tree)?;

    Ok(BackupReport {
        source: source.to_mail_location(),
        destination: out.to_path_buf(),
        folders: manifest.header.folders,
        messages: manifest.header.messages,
        bytes: manifest.header.bytes,
        bytes_copied: total.bytes,
        messages_linked: total.linked,
        lock_hold_ms: held.as_secs_f64() * 1000.0,
        lock_attempts: attempts,
        seconds: started.elapsed().as_secs_f64(),
        passes,
        changed_during_backup: changed,
        taken_at,
        warnings: tree.warnings.clone(),
        folder_details: manifest
            .folders
            .iter()
            .map(|f| FolderSummary {
                name: f.name.clone(),
                path: f.path.clone(),
                messages: f.messages,
                bytes: manifest.messages.iter().filter(|m| m.folder == f.path).map(|m| m.size).sum(),
            })
            .collect(),
    })
}

/// Best effort: index files are not protected by the uidlist lock, and Dovecot rebuilds
/// them from the Maildir if they disagree.
fn copy_indexes(source: &MailLocation, tree: &Tree) {
    let wanted = |n: &str| n.starts_with("dovecot.index") || n.starts_with("dovecot.list.index");
    let mut dirs: Vec<(PathBuf, PathBuf)> =
        tree.folders.iter().map(|(rel, s)| (s.folder.index_dir.clone(), tree.staged_dir(rel))).collect();
    dirs.push((source.index.clone().unwrap_or_else(|| source.root.clone()), tree.staging.clone()));
    for (from, to) in dirs {
        let Ok(rd) = fs::read_dir(&from) else { continue };
        for e in rd.flatten() {
            let name = e.file_name();
            if wanted(&name.to_string_lossy()) && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                let dst = to.join(&name);
                if !dst.exists() {
                    let _ = copy::copy_file(&e.path(), &dst, tree.keep_owner);
                }
            }
        }
    }
}

/// Gives every staged folder dir (and cur/new/tmp) the source's mode, owner and times.
/// Done last: writing into a directory changes its mtime.
fn finish_dirs(source: &MailLocation, tree: &Tree) -> Result<(), BackupError> {
    // Deepest first, so setting a child's times does not disturb its parent's afterwards.
    let mut dirs: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (rel, state) in &tree.folders {
        for sub in ["cur", "new", "tmp"] {
            dirs.push((state.folder.mail_dir.join(sub), tree.staged_dir(rel).join(sub)));
        }
        dirs.push((state.folder.mail_dir.clone(), tree.staged_dir(rel)));
    }
    // LAYOUT=fs parents that are not folders themselves.
    for rel in tree.folders.keys() {
        let mut p = rel.parent();
        while let Some(parent) = p.filter(|p| !p.as_os_str().is_empty()) {
            if !tree.folders.contains_key(parent) {
                dirs.push((source.root.join(parent), tree.staged_dir(parent)));
            }
            p = parent.parent();
        }
    }
    dirs.sort_by_key(|(_, d)| std::cmp::Reverse(d.components().count()));
    dirs.dedup_by(|a, b| a.1 == b.1);
    for (src, dst) in dirs {
        match fs::symlink_metadata(&src) {
            Ok(md) if md.is_dir() => {
                copy::apply_dir_metadata(&dst, &md, tree.keep_owner).map_err(io_err("set metadata of", &dst))?;
            }
            _ => {} // gone meanwhile: keep our defaults
        }
    }
    Ok(())
}

fn build_manifest(source: &MailLocation, tree: &Tree, taken_at: i64, held: Duration, bytes_copied: u64) -> Result<Manifest, BackupError> {
    let mut folders = Vec::new();
    let mut messages = Vec::new();
    let mut bytes = 0u64;
    for (rel, state) in &tree.folders {
        let path = rel.to_string_lossy().into_owned();
        let uidlist_path = tree.staged_dir(rel).join(UIDLIST);
        let uidlist = if uidlist_path.exists() { Uidlist::read(&uidlist_path).ok() } else { None };
        let mut entries: Vec<_> = state.entries.values().collect();
        let uniques: HashSet<&str> = entries.iter().filter_map(|e| MessageName::parse(&e.name)).map(|n| n.unique()).collect();
        let mut uidlist_expunged: Vec<String> = uidlist
            .iter()
            .flat_map(|u| u.entries.iter())
            .map(|e| e.unique.split(':').next().unwrap_or(&e.unique))
            .filter(|u| !uniques.contains(u))
            .map(str::to_string)
            .collect();
        uidlist_expunged.sort();
        entries.sort_by(|a, b| (a.sub, &a.name).cmp(&(b.sub, &b.name)));
        for e in &entries {
            let name = MessageName::parse(&e.name);
            bytes += e.size;
            messages.push(MessageRecord {
                folder: path.clone(),
                dir: e.sub,
                name: e.name.clone(),
                unique: name.map(|n| n.unique().to_string()).unwrap_or_default(),
                flags: name.map(|n| n.flags().to_string()).unwrap_or_default(),
                size: e.size,
                blake3: e.blake3.clone(),
            });
        }
        folders.push(FolderRecord {
            path,
            name: state.folder.name.clone(),
            uidlist_header: uidlist.map(|u| u.header),
            uidlist_expunged,
            messages: entries.len() as u64,
        });
    }
    Ok(Manifest {
        header: Header {
            format: crate::manifest::FORMAT,
            tool: format!("maildir-backup {}", env!("CARGO_PKG_VERSION")),
            source: source.to_mail_location(),
            layout: source.layout,
            taken_at,
            lock_hold_ms: held.as_millis() as u64,
            folders: folders.len() as u64,
            messages: messages.len() as u64,
            bytes,
            bytes_copied,
        },
        folders,
        messages,
    })
}
