//! The jobs both front ends run. The CLI and the doveadm plugin each turn their own arguments
//! into a [`Destination`] (or a [`SnapshotRef`]) and options, call [`run_backup`] or
//! [`run_restore`], and show the report; checking the paths, making missing parent
//! directories and wording the errors happen here, once. [`hand_off`] hands a link snapshot
//! to an offsite tool; [`all_users`] runs a doveadm command user by user across a cluster.

pub mod all_users;
mod hand_off;
pub use hand_off::{run_hand_off, HandOff, HandOffError, HandOffReport};

use std::path::{Path, PathBuf};

use crate::engine::{self, BackupError, BackupOptions, BackupReport, Mailboxes, Progress};
use crate::maildir::MailLocation;
use crate::metrics;
use crate::repo::status::LastRun;
use crate::repo::{self, RepoError, SnapshotOptions};
use crate::restore::{self, RestoreError, RestoreReport, RestoreRequest};
use crate::staging::{self, StagingError};
use crate::sysexits::{self, ExitCode};
use crate::template::{self, TemplateError};

/// A doveadm destination template starting with this writes a snapshot into a repository.
pub const REPO_PREFIX: &str = "repo:";

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("relative path {0} but the working directory it is relative to is unknown; give an absolute path")]
    NoBase(PathBuf),
    #[error("cannot derive a series name from {0}; give --name")]
    NoSeriesName(PathBuf),
    #[error("no snapshot in {0}")]
    NoSnapshot(PathBuf),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    HandOff(#[from] HandOffError),
    #[error("{0:?} is not a repository (repo:REPO): only a repository keeps a record of its runs")]
    NotARepo(String),
    #[error("{source}; nothing was published at {}", dest.display())]
    Unpublished { dest: PathBuf, source: Box<JobError> },
}

impl From<StagingError> for JobError {
    fn from(e: StagingError) -> Self {
        JobError::Backup(e.into())
    }
}

impl From<crate::fsx::FsError> for JobError {
    fn from(e: crate::fsx::FsError) -> Self {
        JobError::Backup(e.into())
    }
}

impl ExitCode for JobError {
    fn exit_code(&self) -> i32 {
        match self {
            JobError::Template(_) | JobError::NoBase(_) | JobError::NoSeriesName(_) | JobError::NotARepo(_) => sysexits::EX_USAGE,
            JobError::NoSnapshot(_) => sysexits::EX_NOINPUT,
            JobError::Backup(e) => e.exit_code(),
            JobError::Repo(e) => e.exit_code(),
            JobError::Restore(e) => e.exit_code(),
            JobError::HandOff(e) => e.exit_code(),
            JobError::Unpublished { source, .. } => source.exit_code(),
        }
    }
}

/// Where a backup goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A new directory, published whole or not at all (its parents made if missing).
    Dir(PathBuf),
    /// A new dated snapshot in `repo/<series>/`, messages unchanged since the previous one
    /// hard-linked from it.
    Repo { repo: PathBuf, series: String, options: SnapshotOptions },
}

impl Destination {
    /// A snapshot series in `repo`, named `name` or else after the source's directory.
    pub fn repo(repo: PathBuf, name: Option<String>, source: &MailLocation, options: SnapshotOptions) -> Result<Destination, JobError> {
        let series = name.or_else(|| repo::default_name(&source.root)).ok_or_else(|| JobError::NoSeriesName(source.root.clone()))?;
        repo::check_series_name(&series)?;
        Ok(Destination::Repo { repo, series, options })
    }

    /// From a doveadm template for `user`: `repo:REPO` (a series named after the user) or a
    /// directory, per-user variables expanded, a relative path taken from `base`.
    pub fn from_template(template: &str, user: &str, base: Option<&Path>) -> Result<Destination, JobError> {
        match template.strip_prefix(REPO_PREFIX) {
            Some(repo) => {
                repo::check_series_name(user)?;
                Ok(Destination::Repo { repo: user_path(repo, user, base)?, series: user.to_string(), options: SnapshotOptions::default() })
            }
            None => Ok(Destination::Dir(user_path(template, user, base)?)),
        }
    }

    /// Where the backup appears (for messages).
    pub fn path(&self) -> PathBuf {
        match self {
            Destination::Dir(p) => p.clone(),
            Destination::Repo { repo, series, .. } => repo.join(series),
        }
    }
}

/// A backup to restore from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// A backup or snapshot directory (`SERIES/latest` included).
    Path(PathBuf),
    /// The newest snapshot of a series.
    Latest(PathBuf),
}

impl SnapshotRef {
    /// From a doveadm template for `user`: `repo:REPO` (the newest snapshot of the user's
    /// series) or a backup directory; a relative path is taken from `base`.
    pub fn from_template(template: &str, user: &str, base: Option<&Path>) -> Result<SnapshotRef, JobError> {
        match template.strip_prefix(REPO_PREFIX) {
            Some(repo) => Ok(SnapshotRef::Latest(user_path(repo, user, base)?.join(user))),
            None => Ok(SnapshotRef::Path(user_path(template, user, base)?)),
        }
    }

    fn resolve(&self) -> Result<PathBuf, JobError> {
        match self {
            SnapshotRef::Path(p) => Ok(p.clone()),
            SnapshotRef::Latest(series) => repo::latest_path(series).ok_or_else(|| JobError::NoSnapshot(series.clone())),
        }
    }
}

/// `template` expanded for `user`, made absolute from `base` if relative.
pub fn user_path(template: &str, user: &str, base: Option<&Path>) -> Result<PathBuf, JobError> {
    let path = PathBuf::from(template::expand(template, user)?);
    match base {
        _ if path.is_absolute() => Ok(path),
        Some(base) => Ok(base.join(path)),
        None => Err(JobError::NoBase(path)),
    }
}

/// The record of `user`'s last run into the repository a doveadm template (`repo:REPO`) names;
/// None if it has none (no run yet).
pub fn last_run(template: &str, user: &str, base: Option<&Path>) -> Result<Option<LastRun>, JobError> {
    let Destination::Repo { repo, series, .. } = Destination::from_template(template, user, base)? else {
        return Err(JobError::NotARepo(template.to_string()));
    };
    let dir = match crate::fsx::Dir::open(&repo.join(&series)) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(repo::status::read(&dir).map_err(RepoError::from)?)
}

/// A Prometheus textfile to keep a user's backup metrics in, and the user's name there.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub file: PathBuf,
    pub user: String,
}

/// Backs up `source`, whose folders and locks `mailboxes` gives, into `dest`: all of it, or
/// nothing (then the error says so). Either way the run is recorded in the repository (for
/// a repository destination) and in `metrics`; a failure to record is only a warning.
pub fn run_backup(
    source: &MailLocation,
    mailboxes: &dyn Mailboxes,
    dest: &Destination,
    opts: &BackupOptions,
    progress: &dyn Progress,
    metrics: Option<&Metrics>,
) -> Result<BackupReport, JobError> {
    let started = chrono::Utc::now().timestamp();
    let result = backup(source, mailboxes, dest, opts, progress);
    let mut run = match &result {
        Ok(r) => LastRun {
            started,
            finished: chrono::Utc::now().timestamp(),
            ok: true,
            snapshot: r.destination.file_name().map(|n| n.to_string_lossy().into_owned()),
            seconds: r.seconds,
            lock_hold_ms: r.lock_hold_ms,
            messages: r.messages,
            bytes: r.bytes,
            warnings: r.warnings.len() as u64,
            ..Default::default()
        },
        Err(e) => LastRun::failed(started, chrono::Utc::now().timestamp(), e.exit_code(), &e.to_string()),
    };
    if let Destination::Repo { repo, series, .. } = dest {
        match repo::record_run(repo, series, run.clone()) {
            Ok(recorded) => run = recorded,
            Err(e) => crate::warnings::defer(format!("the run was not recorded in the repository: {e}")),
        }
    }
    if let Some(m) = metrics {
        if let Err(e) = metrics::update(&m.file, &m.user, &run) {
            crate::warnings::defer(format!("the metrics were not updated: {e}"));
        }
    }
    result
}

fn backup(source: &MailLocation, mailboxes: &dyn Mailboxes, dest: &Destination, opts: &BackupOptions, progress: &dyn Progress) -> Result<BackupReport, JobError> {
    let attempt = || -> Result<BackupReport, JobError> {
        let md = engine::open_source(source)?;
        // Before creating any directory: never a destination inside the Maildir it backs up.
        engine::check_outside(&md, &dest.path())?;
        match dest {
            Destination::Dir(path) => {
                let (parent, name) = staging::split_dest(path)?;
                Ok(engine::backup_to(&md, mailboxes, &parent, &name, opts, engine::InRepo::default(), progress)?)
            }
            Destination::Repo { repo, series, options } => Ok(repo::snapshot(&md, mailboxes, repo, series, opts, *options, progress)?),
        }
    };
    attempt().map_err(|e| JobError::Unpublished { dest: dest.path(), source: Box::new(e) })
}

/// What to restore, from where, into which Maildir.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub snapshot: SnapshotRef,
    pub target: MailLocation,
    pub request: RestoreRequest,
}

/// Restores as `plan` says (with `request.dry_run`, only says what it would do).
pub fn run_restore(plan: &RestorePlan) -> Result<RestoreReport, JobError> {
    let snapshot = plan.snapshot.resolve()?;
    Ok(restore::restore(&snapshot, &plan.target, &plan.request)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_give_destinations() {
        let base = Path::new("/start");
        assert_eq!(Destination::from_template("/b/%n", "al@d", None).unwrap(), Destination::Dir("/b/al".into()));
        assert_eq!(Destination::from_template("b/%u", "al", Some(base)).unwrap(), Destination::Dir("/start/b/al".into()));
        assert_eq!(
            Destination::from_template("repo:/r/%d", "al@d", None).unwrap(),
            Destination::Repo { repo: "/r/d".into(), series: "al@d".into(), options: SnapshotOptions::default() }
        );
        assert!(matches!(Destination::from_template("rel", "al", None), Err(JobError::NoBase(_))));
        assert!(matches!(Destination::from_template("/b/%x", "al", None), Err(JobError::Template(_))));
        assert_eq!(SnapshotRef::from_template("repo:/r", "al", None).unwrap(), SnapshotRef::Latest("/r/al".into()));
        assert_eq!(SnapshotRef::from_template("s/%u", "al", Some(base)).unwrap(), SnapshotRef::Path("/start/s/al".into()));
    }

    #[test]
    fn series_names_are_checked() {
        let src = MailLocation::plain("/srv/mail/alice/Maildir");
        let d = Destination::repo("/r".into(), None, &src, SnapshotOptions { paranoid: true, imap_view: false }).unwrap();
        assert_eq!(d, Destination::Repo { repo: "/r".into(), series: "alice".into(), options: SnapshotOptions { paranoid: true, imap_view: false } });
        assert_eq!(d.path(), PathBuf::from("/r/alice"));
        assert!(Destination::repo("/r".into(), Some(".hidden".into()), &src, SnapshotOptions::default()).is_err());
        assert!(Destination::repo("/r".into(), Some("a/b".into()), &src, SnapshotOptions::default()).is_err());
        assert!(matches!(Destination::repo("/r".into(), None, &MailLocation::plain("/"), SnapshotOptions::default()), Err(JobError::NoSeriesName(_))));
    }
}
