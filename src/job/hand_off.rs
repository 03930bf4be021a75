//! Handing a consistent view of a Maildir to an offsite tool (restic, borg): a link snapshot
//! (`--link`) at a path that stays the same from run to run, because their change detection
//! and caches key on paths; the admin's command run in it; the snapshot removed again. One
//! hand-off per stage at a time (an flock beside it), and a stage left by a killed run is
//! removed by the next.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};

use nix::unistd::{getegid, geteuid, setresgid, setresuid};

use crate::engine::{self, BackupOptions, BackupReport, Mailboxes, MessageFiles, Progress};
use crate::fsx::{running_as_root, Dir, Kind};
use crate::maildir::MailLocation;
use crate::manifest::MANIFEST_NAME;
use crate::staging;
use crate::sysexits::{self, ExitCode};

use super::JobError;

/// One hand-off: where the snapshot is staged, whose mail it is, and what runs on it.
#[derive(Debug, Clone)]
pub struct HandOff {
    pub stage: PathBuf,
    pub user: String,
    /// The program and its arguments, run in the stage directory.
    pub command: Vec<OsString>,
    /// Leave the snapshot at `stage` afterwards (the next hand-off replaces it).
    pub keep_stage: bool,
    /// Send the tool's standard output to our standard error (doveadm's carries its table).
    pub stdout_to_stderr: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HandOffError {
    #[error("{0} exists and is not a stage of maildir-backup (no {MANIFEST_NAME} in it); remove it or choose another stage")]
    NotAStage(PathBuf),
    #[error("{dir} must be a directory only root can enter (owned by root, mode 0700, below directories only root can change): the mail user could otherwise change the snapshot while {program} reads it as root ({why})")]
    StageNotPrivate { dir: PathBuf, program: String, why: String },
    #[error("another hand-off is using {0}")]
    Busy(PathBuf),
    #[error("no command to hand {0} to")]
    NoCommand(PathBuf),
    #[error("cannot run {program}: {source}")]
    CannotRun { program: String, source: io::Error },
    #[error("{program} failed ({status}) on the snapshot of {messages} messages at {stage}")]
    CommandFailed { program: String, status: ExitStatus, messages: u64, stage: PathBuf },
}

impl ExitCode for HandOffError {
    fn exit_code(&self) -> i32 {
        match self {
            HandOffError::NotAStage(_) => sysexits::EX_CANTCREAT,
            HandOffError::StageNotPrivate { .. } => sysexits::EX_NOPERM,
            HandOffError::Busy(_) => sysexits::EX_TEMPFAIL,
            HandOffError::NoCommand(_) => sysexits::EX_USAGE,
            HandOffError::CannotRun { .. } => sysexits::EX_UNAVAILABLE,
            // The tool's own status, so that e.g. restic's 3 ("some files unreadable") shows.
            HandOffError::CommandFailed { status, .. } => {
                use std::os::unix::process::ExitStatusExt;
                status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(sysexits::EX_SOFTWARE)
            }
        }
    }
}

/// What was handed off: the snapshot's report (its destination is the stage).
pub type HandOffReport = BackupReport;

/// Snapshots `source` with links at `h.stage` and runs `h.command` in it, with the user, the
/// snapshot's time and the stage in the environment (`MAILDIR_BACKUP_USER`, `_TIME`, `_STAGE`).
pub fn run_hand_off(
    source: &MailLocation,
    mailboxes: &dyn Mailboxes,
    h: &HandOff,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<HandOffReport, JobError> {
    let program = h.command.first().ok_or_else(|| HandOffError::NoCommand(h.stage.clone()))?;
    let (parent, name) = staging::split_dest(&h.stage)?;
    if running_as_root() {
        check_private(&parent, program)?;
    }
    let _turn = take_turn(&parent, &name, &h.stage)?;
    remove_stage(&parent, &name, &h.stage)?;
    let checksums = matches!(opts.messages, MessageFiles::Link { checksums: true });
    let opts = BackupOptions { messages: MessageFiles::Link { checksums }, ..opts.clone() };
    let md = engine::open_source(source)?;
    engine::check_outside(&md, &h.stage)?;
    let report = engine::backup_to(&md, mailboxes, &parent, &name, &opts, engine::InRepo::default(), progress)?;
    let status = tool_command(h, program, &report).and_then(|mut c| c.status());
    if !h.keep_stage {
        parent.remove_tree(&name)?;
    }
    let program = program.to_string_lossy().into_owned();
    match status {
        Ok(s) if s.success() => Ok(report),
        Ok(status) => Err(HandOffError::CommandFailed { program, status, messages: report.messages, stage: h.stage.clone() }.into()),
        Err(source) => Err(HandOffError::CannotRun { program, source }.into()),
    }
}

/// The tool, to run in the stage with our effective ids only: doveadm -A switches users with
/// seteuid and keeps root as the real and saved id, which a child could take back (a shell
/// would even do so itself), and the tool would then read a user's stage as root.
fn tool_command(h: &HandOff, program: &OsStr, report: &BackupReport) -> io::Result<Command> {
    let mut c = Command::new(program);
    c.args(&h.command[1..])
        .current_dir(&h.stage)
        .env("MAILDIR_BACKUP_USER", &h.user)
        .env("MAILDIR_BACKUP_TIME", taken_at(report))
        .env("MAILDIR_BACKUP_STAGE", &h.stage);
    if h.stdout_to_stderr {
        c.stdout(io::stderr().as_fd().try_clone_to_owned()?);
    }
    let (uid, gid) = (geteuid(), getegid());
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            setresgid(gid, gid, gid)?;
            setresuid(uid, uid, uid)?;
            Ok(())
        });
    }
    Ok(c)
}

/// Run as root, the tool reads the stage by its path, where the mail user owns every directory
/// below the top (owners are kept): only a parent no one else can enter keeps the user from
/// swapping them for symlinks mid-read, and only ancestors no one else can change keep that
/// parent where its path says.
fn check_private(parent: &Dir, program: &OsStr) -> Result<(), JobError> {
    let refuse = |why: String| HandOffError::StageNotPrivate { dir: parent.path().to_path_buf(), program: program.to_string_lossy().into_owned(), why };
    let ancestors = parent.ancestors()?;
    let own = &ancestors[0];
    if own.owner().uid != 0 || own.mode() & 0o077 != 0 {
        return Err(refuse(format!("it is owned by uid {} with mode {:04o}", own.owner().uid, own.mode())).into());
    }
    for (depth, a) in ancestors.iter().enumerate().skip(1) {
        let sticky = a.mode() & 0o1000 != 0;
        if a.owner().uid != 0 || (a.mode() & 0o022 != 0 && !sticky) {
            let shown = parent.path().ancestors().nth(depth).map_or_else(|| format!("{depth} levels up"), |p| p.display().to_string());
            return Err(refuse(format!("{shown} above it is owned by uid {} with mode {:04o}", a.owner().uid, a.mode())).into());
        }
    }
    Ok(())
}

/// The reconcile instant, RFC 3339 in UTC (e.g. for a restic tag or a borg archive name).
fn taken_at(r: &BackupReport) -> String {
    chrono::DateTime::from_timestamp(r.taken_at, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

/// An exclusive flock on `.<name>.maildir-backup-hand-off` beside the stage, held until dropped.
fn take_turn(parent: &Dir, name: &OsStr, stage: &Path) -> Result<std::fs::File, JobError> {
    let mut lock_name = OsString::from(".");
    lock_name.push(name);
    lock_name.push(".maildir-backup-hand-off");
    Ok(parent.lock_file(&lock_name, false)?.ok_or_else(|| HandOffError::Busy(stage.to_path_buf()))?)
}

/// Removes the snapshot an earlier hand-off left at the stage (kept, or killed); anything else
/// there is not ours to remove.
fn remove_stage(parent: &Dir, name: &OsStr, stage: &Path) -> Result<(), JobError> {
    let Some(md) = parent.lstat(name)? else { return Ok(()) };
    let ours = md.kind() == Kind::Dir && parent.lstat(Path::new(name).join(MANIFEST_NAME))?.is_some_and(|m| m.is_file());
    if !ours {
        return Err(HandOffError::NotAStage(stage.to_path_buf()).into());
    }
    parent.remove_tree(name)?;
    Ok(())
}
