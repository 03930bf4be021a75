//! A backup repository: `REPO/<name>/<UTC timestamp>/` snapshots, each a complete,
//! self-contained backup with its manifest, and `REPO/<name>/latest` pointing at the newest.
//! A message already in the previous snapshot is hard-linked from it, found by its Maildir
//! unique name (so a flag change, which renames the file, costs one link, not a copy), and so
//! is a control file that is still the same file (most folders' uidlists, most nights).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};

use crate::engine::{self, BackupError, BackupOptions, BackupReport, InRepo, Mailboxes, MessageFiles, Progress, Reuse, Store};
use crate::fsx::{self, Dir, DirStamp, FsError, Replace};
use crate::maildir::{Maildir, Subdir};
use crate::manifest::{part, FolderRecord, Manifest, MessageRecord, MANIFEST_NAME};
use crate::store::{self, MessageDirs};
use message_index::MessageIndex;
use crate::staging::{Staging, STAGING_SUFFIX};

pub mod imap_view;
mod message_index;
pub mod status;
use status::{LastRun, StatusError};

pub const LATEST: &str = "latest";
/// Snapshot directory names: UTC, sortable, no colons.
pub const TIME_FORMAT: &str = "%Y-%m-%dT%H%M%SZ";
/// Mode of a repository, and of each series in it, when we create them: root's backups are
/// for root's eyes.
const REPO_MODE: u32 = 0o700;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    /// Where it is (for messages).
    pub path: PathBuf,
    pub time: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0} is neither a repository nor a snapshot series (no snapshots found)")]
    NotARepo(PathBuf),
    #[error("repository name {0:?} is not usable as a directory name")]
    BadName(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("the IMAP view of {snapshot}: {what}")]
    View { snapshot: PathBuf, what: String },
    #[error("{0}: {1}; the store's unused entries are kept while a snapshot's manifest cannot be read")]
    References(PathBuf, crate::manifest::ManifestError),
}

impl crate::sysexits::ExitCode for RepoError {
    fn exit_code(&self) -> i32 {
        match self {
            RepoError::Fs(e) => e.exit_code(),
            RepoError::NotARepo(_) => crate::sysexits::EX_NOINPUT,
            RepoError::BadName(_) => crate::sysexits::EX_USAGE,
            RepoError::Backup(e) => e.exit_code(),
            RepoError::Status(StatusError::Fs(e)) => e.exit_code(),
            RepoError::Status(StatusError::Unreadable { .. }) | RepoError::View { .. } | RepoError::References(..) => crate::sysexits::EX_DATAERR,
        }
    }
}

pub fn parse_time(name: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(name, TIME_FORMAT).ok().map(|t| t.and_utc())
}

/// A series of snapshots (`REPO/<name>`), opened.
pub struct Series {
    pub name: String,
    pub dir: Dir,
}

impl Series {
    /// Its snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, RepoError> {
        list_snapshots(&self.dir)
    }
}

/// The snapshots in a series directory, oldest first.
pub fn list_snapshots(series: &Dir) -> Result<Vec<Snapshot>, RepoError> {
    let mut out = Vec::new();
    for e in series.list()? {
        let Some(name) = e.name.to_str() else { continue };
        if let (Some(time), fsx::Kind::Dir) = (parse_time(name), e.kind) {
            out.push(Snapshot { path: series.show(name), name: name.to_string(), time });
        }
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// Whether `dir` is a series: it holds snapshots, or the record of a run that made none.
fn is_series(dir: &Dir) -> Result<bool, RepoError> {
    Ok(!list_snapshots(dir)?.is_empty() || dir.lstat(status::LAST_RUN)?.is_some())
}

/// The series under `path`: `path` itself if it is one, else its subdirectories that are.
/// Sorted by name.
pub fn series_under(path: &Path) -> Result<Vec<Series>, RepoError> {
    let dir = Dir::open(path)?;
    if is_series(&dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(vec![Series { name, dir }]);
    }
    let mut out = Vec::new();
    for e in dir.list()? {
        let Some(name) = e.name.to_str().filter(|n| !n.starts_with('.')) else { continue };
        if e.kind != fsx::Kind::Dir {
            continue;
        }
        let sub = dir.sub(name)?;
        if is_series(&sub)? {
            out.push(Series { name: name.to_string(), dir: sub });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if out.is_empty() {
        return Err(RepoError::NotARepo(path.to_path_buf()));
    }
    Ok(out)
}

/// A default series name for a Maildir: `alice` for `/srv/mail/alice/Maildir`.
pub fn default_name(root: &Path) -> Option<String> {
    let last = root.file_name()?.to_string_lossy().into_owned();
    if last.eq_ignore_ascii_case("maildir") {
        root.parent()?.file_name().map(|n| n.to_string_lossy().into_owned())
    } else {
        Some(last)
    }
}

/// The previous snapshot, offered for reuse: its folders whose source directories have not
/// changed are taken over whole (its store entries shared), its messages hard-linked into
/// the others, its unchanged control files linked.
pub struct PreviousSnapshot {
    series: Dir,
    dir: Dir,
    /// Its folder records, by path: all a snapshot needs of it when little changed.
    folders: HashMap<String, FolderRecord>,
    /// Its messages by unique name, read only once a message is to be linked.
    messages: OnceLock<Option<KeptMessages>>,
    paranoid: bool,
    message_dirs: MessageDirs,
}

/// The previous snapshot's messages, kept small: see [`MessageIndex`].
struct KeptMessages {
    /// Message directories (folder, cur or new), as the index numbers them.
    dirs: Vec<(String, Subdir)>,
    /// None once no message is linked any more (see `done_linking`).
    index: RwLock<Option<MessageIndex>>,
}

impl PreviousSnapshot {
    /// The snapshot `name` of `series`; None if it has no usable manifest.
    pub fn load(series: &Dir, name: &str, paranoid: bool) -> Option<PreviousSnapshot> {
        let dir = series.sub(name).ok()?;
        let (_, folders) = Manifest::read_folders_only(&dir).ok()?;
        let folders = folders.into_iter().map(|f| (f.path.clone(), f)).collect();
        let message_dirs = MessageDirs::new(&dir).ok()?;
        Some(PreviousSnapshot { series: series.try_clone().ok()?, dir, folders, messages: OnceLock::new(), paranoid, message_dirs })
    }

    /// Its messages by unique name, read from its manifest the first time they are asked for
    /// (see `MessageIndex::read` for why that cannot deadlock the copy tasks that all wait on
    /// this cell).
    fn messages(&self) -> Option<&KeptMessages> {
        self.messages.get_or_init(|| self.read_messages()).as_ref()
    }

    fn read_messages(&self) -> Option<KeptMessages> {
        // Each folder's cur and new, numbered in turn.
        let dirs: Vec<(String, Subdir)> = self.folders.keys().flat_map(|path| Subdir::ALL.map(|sub| (path.clone(), sub))).collect();
        let first_dir: HashMap<&str, u32> = self.folders.keys().enumerate().map(|(i, path)| (path.as_str(), 2 * i as u32)).collect();
        let dir_of = |m: &MessageRecord| Some(first_dir.get(m.folder.as_str())? + m.dir.index() as u32);
        let scratch = || self.series.scratch_file().ok().flatten();
        let stored: Vec<(&String, &str)> = self.folders.iter().filter_map(|(path, f)| Some((path, f.store.as_deref()?))).collect();
        let index = if stored.len() < self.folders.len() {
            // Records in the manifest itself (an older snapshot): read in one pass.
            let total = self.folders.values().fold(0u64, |sum, f| sum.saturating_add(f.messages));
            MessageIndex::read(&[total], scratch, |_, index| {
                Manifest::visit(&self.dir, |_| {}, |m| dir_of(&m).map_or((), |dir| index.push(&m, dir))).is_ok()
            })
        } else {
            // Each folder's entry read.
            let counts: Vec<u64> = stored.iter().map(|(path, _)| self.folders[*path].messages).collect();
            MessageIndex::read(&counts, scratch, |i, index| {
                let (path, id) = stored[i];
                let first = first_dir[path.as_str()];
                Manifest::visit_stored(&self.series, id, |m| index.push(&m, first + m.dir.index() as u32)).is_ok()
            })
        }?;
        Some(KeptMessages { dirs, index: RwLock::new(Some(index)) })
    }

    /// The previous snapshot's copy of the control file `rel`, open, if it is what copying
    /// `source` with `owner` would make: same size, mode, owner, times and bytes.
    fn same_control(&self, rel: &Path, source: &mut fsx::ReadFile, owner: Option<fsx::Owner>) -> Option<fsx::ReadFile> {
        let mut old = self.dir.open_read(rel).ok()?;
        let (m, s) = (&old.meta, &source.meta);
        let owner_ok = owner.is_none_or(|o| m.owner() == o);
        if !(owner_ok && m.size() == s.size() && m.mode() == fsx::safe_mode(s.mode()) && (m.mtime(), m.mtime_nsec()) == (s.mtime(), s.mtime_nsec())) {
            return None;
        }
        let same = fsx::hash_file(&mut old).ok()? == fsx::hash_file(source).ok()?;
        same.then_some(old)
    }

}

impl Reuse for PreviousSnapshot {
    fn read_ahead(&self) {
        self.messages.get_or_init(|| self.read_messages());
    }

    fn ready(&self) -> bool {
        self.messages.get().is_some()
    }

    fn done_linking(&self) {
        if let Some(Some(kept)) = self.messages.get() {
            // The index takes 12 bytes a message: the records' writing needs that room more.
            drop(kept.index.write().map(|mut index| index.take()));
        }
    }

    fn link_control(&self, rel: &Path, source: &mut fsx::ReadFile, owner: Option<fsx::Owner>, dst: &Dir, name: &str) -> bool {
        let Some(old) = self.same_control(rel, source, owner) else { return false };
        // The very file compared, under a temporary name, then over whatever is there.
        let Ok(tmp) = dst.link_open_file(&old.file, &format!(".{name}.maildir-backup")) else { return false };
        if dst.rename(&tmp, dst, name, Replace::Allowed).is_err() {
            let _ = dst.unlink(&tmp);
            return false;
        }
        true
    }

    fn link_into(&self, unique: &str, source_size: u64, dst: &Dir, name: &str) -> Option<String> {
        let messages = self.messages()?;
        let kept = messages.index.read().ok()?.as_ref()?.get(unique)?;
        let (old_name, size) = (kept.name.as_str(), kept.size);
        if source_size != size {
            return None;
        }
        let (folder, sub) = messages.dirs.get(kept.dir as usize)?;
        let from = self.message_dirs.get(folder, *sub).ok()??;
        let blake3 = blake3::Hash::from(kept.blake3).to_hex().to_string();
        if self.paranoid && fsx::hash_file(&mut from.open_read(old_name).ok()?).ok()?.1 != blake3 {
            return None;
        }
        from.link(old_name, dst, name).ok()?;
        // What was linked is in our staging now, where nobody else can change it: it must
        // still be what the manifest says, or we copy afresh.
        match dst.lstat(name) {
            Ok(Some(m)) if m.is_file() && m.size() == size => Some(blake3),
            _ => {
                let _ = dst.unlink(name);
                None
            }
        }
    }

    fn take_over(&self, rel: &Path, now: [Option<DirStamp>; 2]) -> Option<FolderRecord> {
        // --paranoid checks every message it links: nothing is taken on trust.
        if self.paranoid {
            return None;
        }
        let record = self.folders.get(rel.to_str()?)?;
        let (id, source) = (record.store.as_deref()?, record.source_dirs?);
        if !source.unchanged(now) {
            return None;
        }
        // Its entry must still hold the folder's directories.
        let entry = store::open_entry(&self.series, id).ok()?;
        let whole = Subdir::ALL.iter().all(|s| entry.lstat(s.as_str()).ok().flatten().is_some_and(|m| m.is_dir()));
        whole.then(|| record.clone())
    }

    fn stored_uniques(&self, id: &str) -> Result<HashSet<String>, BackupError> {
        let mut uniques = HashSet::new();
        Manifest::visit_stored(&self.series, id, |m| {
            uniques.insert(m.unique);
        })?;
        Ok(uniques)
    }
}

/// The store of the series a snapshot is taken into.
struct SeriesStore<'a> {
    series: &'a Dir,
    previous: Option<&'a PreviousSnapshot>,
}

impl Store for SeriesStore<'_> {
    fn store_folder(&self, folder: &str, fdir: &Dir, records: part::Records) -> Result<String, BackupError> {
        let (id, entry) = store::create_entry(self.series)?;
        // The records the previous snapshot kept for the folder: ours are written as changes
        // to them where that is shorter.
        let base = self.previous.and_then(|p| p.folders.get(folder)).and_then(|f| Some((f.store.as_deref()?, f.messages)));
        part::write(self.series, &entry, folder, base, records)?;
        for sub in Subdir::ALL {
            fdir.rename(sub.as_str(), &entry, sub.as_str(), Replace::Never)?;
        }
        store::link_folder(fdir, folder, &id)?;
        Ok(id)
    }
}

/// The newest snapshot of a series, following `latest` if it names one.
pub fn latest(series: &Dir) -> Option<String> {
    if let Ok(Some(target)) = series.read_link(LATEST) {
        // Only a snapshot's own name: `latest` is never followed anywhere else.
        if let Some(name) = target.to_str().filter(|t| parse_time(t).is_some()) {
            if series.lstat(Path::new(name).join(MANIFEST_NAME)).ok().flatten().is_some_and(|m| m.is_file()) {
                return Some(name.to_string());
            }
        }
    }
    list_snapshots(series).ok()?.pop().map(|s| s.name)
}

/// The newest snapshot of the series at the admin's path `series`.
pub fn latest_path(series: &Path) -> Option<PathBuf> {
    let dir = Dir::open(series).ok()?;
    latest(&dir).map(|n| dir.show(n))
}

/// Opens a backup or snapshot the admin named. `SERIES/latest` is the snapshot `latest`
/// names, even in a series the mail user owns (made through doveadm): it is only ever read
/// as the name of a sibling snapshot, never followed as a symlink.
pub fn open_snapshot(path: &Path) -> Result<Dir, FsError> {
    if path.file_name().is_some_and(|n| n == LATEST) {
        let series = Dir::open(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        if series.lstat(LATEST)?.is_some_and(|m| m.kind() == fsx::Kind::Symlink) {
            if let Some(name) = latest(&series) {
                return series.sub(name);
            }
        }
    }
    Dir::open(path)
}

fn point_latest(series: &Dir, snapshot_name: &str) -> Result<(), RepoError> {
    let tmp = format!(".{LATEST}.{:x}", std::process::id());
    series.unlink(&tmp)?;
    series.symlink(Path::new(snapshot_name), &tmp)?;
    series.rename(&tmp, series, LATEST, Replace::Allowed)?;
    Ok(())
}

/// Refuses a series name that is not one plain directory name (or is hidden, like our own
/// staging and deleting names).
pub fn check_series_name(name: &str) -> Result<(), RepoError> {
    if fsx::check_name(OsStr::new(name)).is_err() || name.starts_with('.') {
        return Err(RepoError::BadName(name.to_string()));
    }
    Ok(())
}

/// How a snapshot is taken into a repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Link a message from the previous snapshot only if its checksum still matches too.
    pub paranoid: bool,
    /// Make the series' IMAP view if it has none (one it has is always kept up to date).
    pub imap_view: bool,
}

/// Takes a new snapshot of `md` into `REPO/<name>/<now>`, points `latest` at it and brings the
/// series' IMAP view up to date. The caller has checked that `repo` is outside the Maildir.
pub fn snapshot(
    md: &Maildir,
    mailboxes: &dyn Mailboxes,
    repo: &Path,
    name: &str,
    opts: &BackupOptions,
    snap_opts: SnapshotOptions,
    progress: &dyn Progress,
) -> Result<BackupReport, RepoError> {
    check_series_name(name)?;
    let (repo_dir, _) = Dir::open_or_create(repo, REPO_MODE, None)?;
    let (series, _) = repo_dir.ensure_dir(name, REPO_MODE, None)?;
    remove_dead_staging(&series)?;
    // Held while the snapshot runs: no prune removes a store entry it takes over meanwhile.
    let _store = store::lock(&series, true)?;
    // Linking from the source costs what linking from the previous snapshot does.
    let copying = opts.messages == MessageFiles::Copy;
    let previous = latest(&series).filter(|_| copying).and_then(|p| PreviousSnapshot::load(&series, &p, snap_opts.paranoid));
    // One snapshot per second at most: wait for a fresh name rather than invent one.
    let mut now = Utc::now();
    while series.lstat(now.format(TIME_FORMAT).to_string())?.is_some() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        now = Utc::now();
    }
    let snap_name = now.format(TIME_FORMAT).to_string();
    let repo = InRepo { reuse: previous.as_ref().map(|p| p as &dyn Reuse), store: Some(&SeriesStore { series: &series, previous: previous.as_ref() }) };
    let mut report = engine::backup_to(md, mailboxes, &series, OsStr::new(&snap_name), opts, repo, progress)?;
    point_latest(&series, &snap_name)?;
    // The snapshot is made whatever happens to the view: a failure there is a warning.
    match list_snapshots(&series).and_then(|all| imap_view::refresh(&series, &all, snap_opts.imap_view)) {
        Ok(changes) => report.warnings.extend(changes.into_iter().flat_map(|c| c.warnings)),
        Err(e) => report.warnings.push(format!("the IMAP view of {} was not updated: {e}", series.path().display())),
    }
    Ok(report)
}

/// Records `run` as the last of series `name` in `repo` (both made if missing), carrying on
/// the history of the record it replaces (an unreadable one is replaced without it).
pub fn record_run(repo: &Path, name: &str, run: LastRun) -> Result<LastRun, RepoError> {
    check_series_name(name)?;
    let (repo_dir, _) = Dir::open_or_create(repo, REPO_MODE, None)?;
    let (series, _) = repo_dir.ensure_dir(name, REPO_MODE, None)?;
    let run = run.after(status::read(&series).ok().flatten().as_ref());
    status::write(&series, &run)?;
    Ok(run)
}

/// Removes the staging dirs of killed runs: each had its own timestamp, so no later run
/// would ever reuse (and so clean) its name. A live run's guard keeps its dir.
fn remove_dead_staging(series: &Dir) -> Result<(), RepoError> {
    for e in series.list()? {
        let Some(name) = e.name.to_str() else { continue };
        if let Some(ts) = name.strip_prefix('.').and_then(|n| n.strip_suffix(STAGING_SUFFIX)) {
            // prepare() breaks a dead run's guard and clears its dir; dropping it removes both.
            drop(Staging::prepare(series, OsStr::new(ts)));
        }
    }
    Ok(())
}

/// How many snapshots a prune keeps (restic's rules: each count keeps the newest snapshot of
/// that many distinct days / ISO weeks / months; the newest snapshot is always kept).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct KeepPolicy {
    /// Keep the newest N snapshots.
    #[arg(long = "keep-last", value_name = "N", default_value_t = 0)]
    pub last: usize,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long = "keep-daily", value_name = "N", default_value_t = 0)]
    pub daily: usize,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long = "keep-weekly", value_name = "N", default_value_t = 0)]
    pub weekly: usize,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long = "keep-monthly", value_name = "N", default_value_t = 0)]
    pub monthly: usize,
}

/// Splits `snaps` (any order) into (keep, remove), each newest first.
pub fn plan_prune(snaps: &[Snapshot], policy: KeepPolicy) -> (Vec<Snapshot>, Vec<Snapshot>) {
    let mut sorted: Vec<&Snapshot> = snaps.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then(b.name.cmp(&a.name)));
    let mut buckets: [(usize, Option<String>); 3] = [(policy.daily, None), (policy.weekly, None), (policy.monthly, None)];
    let (mut keep, mut remove) = (Vec::new(), Vec::new());
    for (i, s) in sorted.into_iter().enumerate() {
        let mut kept = i == 0 || i < policy.last;
        let iso = s.time.iso_week();
        let keys = [s.time.format("%Y-%m-%d").to_string(), format!("{}-W{:02}", iso.year(), iso.week()), s.time.format("%Y-%m").to_string()];
        for ((left, last_key), key) in buckets.iter_mut().zip(keys) {
            if *left > 0 && last_key.as_deref() != Some(key.as_str()) {
                *left -= 1;
                *last_key = Some(key);
                kept = true;
            }
        }
        if kept { keep.push(s.clone()) } else { remove.push(s.clone()) }
    }
    (keep, remove)
}

/// What a snapshot being removed is renamed to: `.<name>.maildir-backup-deleting`.
const DELETING_SUFFIX: &str = ".maildir-backup-deleting";

/// Removes a snapshot of `series`: renamed away first (so it vanishes at once), then
/// deleted. Other snapshots are unaffected: each is a full tree, shared files are only hard links.
pub fn remove_snapshot(series: &Dir, snap: &Snapshot) -> Result<(), RepoError> {
    let doomed = format!(".{}{DELETING_SUFFIX}", snap.name);
    series.remove_tree(&doomed)?; // left by an interrupted prune
    series.rename_dir_noreplace(OsStr::new(&snap.name), OsStr::new(&doomed))?;
    series.remove_tree(&doomed)?;
    Ok(())
}

/// Removes the store entries no snapshot of `series` names any more (after a prune): how
/// many, or None while a snapshot runs (they are left for the next prune).
pub fn remove_unused_entries(series: &Dir) -> Result<Option<usize>, RepoError> {
    store::remove_unused(series, || {
        let mut named = Vec::new();
        for snap in list_snapshots(series)? {
            let (_, folders) = Manifest::read_folders_only(&series.sub(&snap.name)?).map_err(|e| RepoError::References(snap.path.clone(), e))?;
            named.extend(folders.into_iter().filter_map(|f| f.store));
        }
        with_bases(series, named)
    })
}

/// The entries `named`, and every base their records are written against.
fn with_bases(series: &Dir, named: Vec<String>) -> Result<store::InUse, RepoError> {
    let linked: HashSet<String> = named.into_iter().collect();
    let (mut bases, mut next): (HashSet<String>, Vec<String>) = (HashSet::new(), linked.iter().cloned().collect());
    while let Some(id) = next.pop() {
        match part::base_of(series, &id) {
            Ok(Some(base)) if !linked.contains(&base) && bases.insert(base.clone()) => next.push(base),
            Ok(_) => {}
            // An entry already gone has no base left to keep.
            Err(crate::manifest::ManifestError::Fs(e)) if e.is_not_found() => {}
            Err(e) => return Err(RepoError::References(series.show(store::STORE_DIR).join(&id), e)),
        }
    }
    Ok(store::InUse { linked, bases })
}

/// Finishes the removals a killed prune left half done (snapshots already renamed away, so
/// no longer listed); returns how many.
pub fn finish_interrupted_removals(series: &Dir) -> Result<usize, RepoError> {
    let mut done = 0;
    for e in series.list()? {
        let Some(name) = e.name.to_str() else { continue };
        let interrupted = name.strip_prefix('.').and_then(|n| n.strip_suffix(DELETING_SUFFIX)).is_some_and(|n| parse_time(n).is_some());
        if interrupted && e.kind == fsx::Kind::Dir {
            series.remove_tree(name)?;
            done += 1;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn an_interrupted_removal_is_finished_by_the_next_prune() {
        let t = tempfile::tempdir().unwrap();
        for name in ["2026-01-01T010000Z", ".2026-01-02T010000Z.maildir-backup-deleting", ".other.maildir-backup-deleting", ".2026-01-03T010000Z.maildir-backup-staging"] {
            std::fs::create_dir_all(t.path().join(name).join("cur")).unwrap();
        }
        std::fs::write(t.path().join(".2026-01-04T010000Z.maildir-backup-deleting"), b"a file").unwrap();
        let series = Dir::open(t.path()).unwrap();
        assert_eq!(finish_interrupted_removals(&series).unwrap(), 1);
        let mut left: Vec<String> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        // Only our own half-removed snapshot goes; nothing else is touched.
        assert_eq!(left, [".2026-01-03T010000Z.maildir-backup-staging", ".2026-01-04T010000Z.maildir-backup-deleting", ".other.maildir-backup-deleting", "2026-01-01T010000Z"]);
    }

    /// Copy tasks that ask for the previous snapshot's records before `read_ahead` did all wait
    /// on the first one's read: it must not run rayon tasks, or its thread, waiting for them,
    /// picks up another copy task, which waits on that very read (a deadlock a CI run hit).
    #[test]
    fn the_first_lookup_from_many_copy_tasks_does_not_deadlock() {
        use crate::test_support::*;
        let t = tmp();
        let root = t.path().join("Maildir");
        let folders: Vec<String> = (1..200).map(|i| format!(".f{i}")).collect();
        make_maildir(&root, &folders.iter().map(String::as_str).collect::<Vec<_>>());
        for (i, rel) in [""].into_iter().chain(folders.iter().map(String::as_str)).enumerate() {
            for m in 0..5 {
                put(&root.join(rel), "cur", &format!("1.M{i}P{m}.h:2,S"), &body(&format!("{i}-{m}")));
            }
        }
        let md = open(&root);
        let opts = crate::engine::BackupOptions::default();
        snapshot(&md, &crate::engine::OnDisk, &t.path().join("repo"), "u", &opts, SnapshotOptions::default(), &crate::engine::NoProgress).unwrap();
        let series = Dir::open(&t.path().join("repo/u")).unwrap();
        let name = latest(&series).unwrap();
        let uniques: Vec<String> = (0..200).flat_map(|i| (0..5).map(move |m| format!("1.M{i}P{m}.h"))).collect();
        let dst = Dir::open(t.path()).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(16).build().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..150 {
                // A fresh previous snapshot each time: its records not read yet.
                let previous = PreviousSnapshot::load(&series, &name, false).unwrap();
                // A size no message has: each lookup reads the records, then links nothing.
                pool.install(|| uniques.par_iter().for_each(|u| assert!(previous.link_into(u, 1, &dst, "never").is_none())));
            }
            done.send(()).unwrap();
        });
        finished.recv_timeout(std::time::Duration::from_secs(120)).expect("the copy tasks deadlocked on the first lookup");
    }

    fn snap(s: &str) -> Snapshot {
        Snapshot { name: s.into(), path: PathBuf::from(s), time: parse_time(s).unwrap() }
    }

    #[test]
    fn prune_policy() {
        let all: Vec<Snapshot> = [
            "2026-01-01T010000Z", "2026-01-01T020000Z", "2026-01-02T010000Z", "2026-01-09T010000Z",
            "2026-02-01T010000Z", "2026-03-01T010000Z", "2026-03-01T020000Z",
        ]
        .iter()
        .map(|s| snap(s))
        .collect();
        let names = |v: Vec<Snapshot>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        let (keep, remove) = plan_prune(&all, KeepPolicy { last: 1, ..Default::default() });
        assert_eq!(names(keep), vec!["2026-03-01T020000Z"]);
        assert_eq!(remove.len(), 6);
        let (keep, _) = plan_prune(&all, KeepPolicy { daily: 3, ..Default::default() });
        assert_eq!(names(keep), vec!["2026-03-01T020000Z", "2026-02-01T010000Z", "2026-01-09T010000Z"]);
        let (keep, _) = plan_prune(&all, KeepPolicy { monthly: 2, last: 2, ..Default::default() });
        assert_eq!(names(keep), vec!["2026-03-01T020000Z", "2026-03-01T010000Z", "2026-02-01T010000Z"]);
        let (keep, _) = plan_prune(&all, KeepPolicy { weekly: 10, ..Default::default() });
        assert_eq!(names(keep), vec!["2026-03-01T020000Z", "2026-02-01T010000Z", "2026-01-09T010000Z", "2026-01-02T010000Z"]);
        // Nothing asked: still never the newest.
        let (keep, _) = plan_prune(&all, KeepPolicy::default());
        assert_eq!(names(keep), vec!["2026-03-01T020000Z"]);
    }
}
