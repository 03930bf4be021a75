//! A backup repository: `REPO/<name>/<UTC timestamp>/` snapshots, each a complete,
//! self-contained backup with its manifest, and `REPO/<name>/latest` pointing at the newest.
//! A message already in the previous snapshot is hard-linked from it, found by its Maildir
//! unique name (so a flag change, which renames the file, costs one link, not a copy).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};

use crate::engine::copy::hash_file;
use crate::engine::{self, BackupError, BackupOptions, BackupReport, Mailboxes, Progress, Reuse};
use crate::maildir::MailLocation;
use crate::manifest::{Manifest, MANIFEST_NAME};

pub const LATEST: &str = "latest";
/// Snapshot directory names: UTC, sortable, no colons.
pub const TIME_FORMAT: &str = "%Y-%m-%dT%H%M%SZ";

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub path: PathBuf,
    pub time: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error("{0} is neither a repository nor a snapshot series (no snapshots found)")]
    NotARepo(PathBuf),
    #[error("repository name {0:?} is not usable as a directory name")]
    BadName(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl crate::sysexits::ExitCode for RepoError {
    fn exit_code(&self) -> i32 {
        match self {
            RepoError::Io { source, .. } => crate::sysexits::for_io_error(source),
            RepoError::NotARepo(_) => crate::sysexits::EX_NOINPUT,
            RepoError::BadName(_) => crate::sysexits::EX_USAGE,
            RepoError::Backup(e) => e.exit_code(),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RepoError + 'a {
    move |source| RepoError::Io { op, path: path.to_path_buf(), source }
}

pub fn parse_time(name: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(name, TIME_FORMAT).ok().map(|t| t.and_utc())
}

/// The snapshots of one series (`REPO/<name>`), oldest first.
pub fn list_snapshots(series: &Path) -> Result<Vec<Snapshot>, RepoError> {
    let mut out = Vec::new();
    for e in fs::read_dir(series).map_err(io_err("read directory", series))? {
        let e = e.map_err(io_err("read directory", series))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(time) = parse_time(&name) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(Snapshot { path: e.path(), name, time });
            }
        }
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// The series under `path`: `path` itself if it holds snapshots, else its subdirectories
/// that do. Sorted by name.
pub fn series_under(path: &Path) -> Result<Vec<PathBuf>, RepoError> {
    if !list_snapshots(path)?.is_empty() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for e in fs::read_dir(path).map_err(io_err("read directory", path))? {
        let e = e.map_err(io_err("read directory", path))?;
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && !e.file_name().to_string_lossy().starts_with('.') && !list_snapshots(&p)?.is_empty() {
            out.push(p);
        }
    }
    out.sort();
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

/// The previous snapshot's messages, offered for hard-linking.
pub struct PreviousSnapshot {
    by_unique: HashMap<String, (PathBuf, u64, String)>,
    paranoid: bool,
}

impl PreviousSnapshot {
    pub fn load(snapshot: &Path, paranoid: bool) -> Option<PreviousSnapshot> {
        let manifest = Manifest::read(&snapshot.join(MANIFEST_NAME)).ok()?;
        let by_unique = manifest
            .messages
            .into_iter()
            .map(|m| {
                let path = snapshot.join(&m.folder).join(m.dir.as_str()).join(&m.name);
                (m.unique, (path, m.size, m.blake3))
            })
            .collect();
        Some(PreviousSnapshot { by_unique, paranoid })
    }
}

impl Reuse for PreviousSnapshot {
    fn find(&self, unique: &str, source_size: u64) -> Option<(PathBuf, u64, String)> {
        let (path, size, blake3) = self.by_unique.get(unique)?;
        if source_size != *size {
            return None;
        }
        // The old copy must still be what its manifest says, or we copy afresh.
        let md = fs::symlink_metadata(path).ok()?;
        if !md.is_file() || md.len() != *size {
            return None;
        }
        if self.paranoid && hash_file(path).ok()?.1 != *blake3 {
            return None;
        }
        Some((path.clone(), *size, blake3.clone()))
    }
}

/// The newest snapshot of a series, following `latest` if it is there.
pub fn latest(series: &Path) -> Option<PathBuf> {
    if let Ok(target) = fs::read_link(series.join(LATEST)) {
        let p = series.join(target);
        if p.join(MANIFEST_NAME).exists() {
            return Some(p);
        }
    }
    list_snapshots(series).ok()?.pop().map(|s| s.path)
}

fn point_latest(series: &Path, snapshot_name: &str) -> Result<(), RepoError> {
    let tmp = series.join(format!(".{LATEST}.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(snapshot_name, &tmp).map_err(io_err("create symlink", &tmp))?;
    fs::rename(&tmp, series.join(LATEST)).map_err(io_err("replace", &series.join(LATEST)))
}

/// Takes a new snapshot of `source` into `REPO/<name>/<now>` and points `latest` at it.
pub fn snapshot(
    source: &MailLocation,
    mailboxes: &dyn Mailboxes,
    repo: &Path,
    name: &str,
    opts: &BackupOptions,
    paranoid: bool,
    progress: &dyn Progress,
) -> Result<BackupReport, RepoError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(RepoError::BadName(name.to_string()));
    }
    let series = repo.join(name);
    // Before creating anything: never a repository inside the Maildir it backs up.
    engine::check_paths(source, &series.join("snapshot"))?;
    fs::create_dir_all(&series).map_err(io_err("create directory", &series))?;
    remove_dead_staging(&series)?;
    let previous = latest(&series).and_then(|p| PreviousSnapshot::load(&p, paranoid));
    // One snapshot per second at most: wait for a fresh name rather than invent one.
    let mut now = Utc::now();
    while series.join(now.format(TIME_FORMAT).to_string()).exists() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        now = Utc::now();
    }
    let snap_name = now.format(TIME_FORMAT).to_string();
    let dest = series.join(&snap_name);
    let report = engine::backup_with(source, mailboxes, &dest, opts, previous.as_ref().map(|p| p as &dyn Reuse), progress)?;
    point_latest(&series, &snap_name)?;
    Ok(report)
}

/// Removes the staging dirs of killed runs: each had its own timestamp, so no later run
/// would ever reuse (and so clean) its name. A live run's guard keeps its dir.
fn remove_dead_staging(series: &Path) -> Result<(), RepoError> {
    for e in fs::read_dir(series).map_err(io_err("read directory", series))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(ts) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".maildir-backup-staging")) {
            // prepare() breaks a dead run's guard and clears its dir; dropping it removes both.
            drop(crate::staging::Staging::prepare(&series.join(ts)));
        }
    }
    Ok(())
}

/// How many snapshots a prune keeps (restic's rules: each count keeps the newest snapshot of
/// that many distinct days / ISO weeks / months; the newest snapshot is always kept).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeepPolicy {
    pub last: usize,
    pub daily: usize,
    pub weekly: usize,
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

/// Removes a snapshot: renamed away first (so it vanishes at once), then deleted. Other
/// snapshots are unaffected: each is a full tree, shared files are only hard links.
pub fn remove_snapshot(snap: &Snapshot) -> Result<(), RepoError> {
    let parent = snap.path.parent().unwrap_or(Path::new("."));
    let doomed = parent.join(format!(".{}.maildir-backup-deleting", snap.name));
    fs::rename(&snap.path, &doomed).map_err(io_err("rename", &snap.path))?;
    fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))
}

#[cfg(test)]
mod tests {
    use super::*;

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
