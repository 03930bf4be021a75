//! `backup` and `verify`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use maildir_backup::engine::{BackupOptions, BackupReport, MessageFiles, OnDisk, Progress};
use maildir_backup::job::{self, Destination, Metrics};
use maildir_backup::maildir::MailLocation;
use maildir_backup::repo::{self, SnapshotOptions};
use maildir_backup::sysexits;
use maildir_backup::verify;
use maildir_backup::warnings;

use super::args::{SourceArgs, UidlistLockArgs};
use super::{Failure, Outcome, Stderr};

/// Back up a live Maildir consistently (bulk copy, then a short reconcile under Dovecot's lock).
#[derive(Args, Debug)]
#[command(after_help = "SOURCE is a Maildir path or a Dovecot 2.3 mail_location such as\n  maildir:/srv/mail/alice:CONTROL=/srv/control/alice:LAYOUT=fs\nFor Dovecot 2.4 settings use --mail-path/--control-path/--index-path/--layout and give only DEST.")]
pub struct BackupArgs {
    /// SOURCE and DEST (DEST only with --mail-path; neither DEST with --repo). DEST must not exist.
    #[arg(value_name = "SOURCE DEST", num_args = 0..=2)]
    pub paths: Vec<String>,
    /// Write a snapshot into this repository (REPO/NAME/<UTC time>) instead of DEST, sharing
    /// the folders unchanged since the previous snapshot whole and hard-linking the unchanged
    /// messages of the others.
    #[arg(long, value_name = "REPO")]
    pub repo: Option<PathBuf>,
    /// The snapshot series name in the repository, and the user in --metrics [default: the
    /// user's directory name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// With --repo: also compare checksums (not only sizes) before linking a message, and share
    /// no folder unchecked.
    #[arg(long, requires = "repo")]
    pub paranoid: bool,
    /// With --repo: show the user their snapshots as read-only IMAP folders (REPO/NAME/imap-view,
    /// for the Dovecot namespace in dovecot-conf/); once made, every snapshot and prune keeps it.
    #[arg(long, requires = "repo")]
    pub imap_view: bool,
    /// Hard-link every message file instead of copying it (instant; DEST or REPO must be on the
    /// Maildir's file system, and the backup shares its disk): a snapshot to hand to restic or
    /// borg. Control files are still copied.
    #[arg(long)]
    pub link: bool,
    /// With --link: read every message to record its checksum anyway.
    #[arg(long, requires = "link")]
    pub checksum: bool,
    /// Keep this user's metrics (last success, duration, lock hold, messages, bytes,
    /// failures) in FILE, a Prometheus node-exporter textfile shared by all users.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How a backup runs and reports.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub lock: UidlistLockArgs,
    /// Parallel copy threads.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// Also copy Dovecot's index files (best effort; Dovecot rebuilds them if they disagree).
    #[arg(long)]
    pub with_indexes: bool,
    /// Print the summary as JSON (for monitoring).
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no summary.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl RunArgs {
    pub fn options(&self, messages: MessageFiles) -> BackupOptions {
        BackupOptions { lock: self.lock.settings(), jobs: self.jobs.into(), with_indexes: self.with_indexes, messages }
    }

    pub fn progress(&self) -> Bar {
        let show = !self.quiet && !self.json && std::io::stderr().is_terminal();
        Bar(show.then(|| {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} messages, {binary_bytes} ({binary_bytes_per_sec}) {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            pb
        }))
    }
}

/// indicatif on a terminal, nothing otherwise.
pub struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn phase(&self, name: &str) {
        if let Some(pb) = &self.0 {
            pb.set_message(name.to_string());
        }
    }
    fn total(&self, messages: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(messages);
        }
    }
    fn advance(&self, messages: u64, _bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(messages);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", units[i]) }
}

fn print_report(r: &BackupReport, run: &RunArgs) {
    warnings::emit(&Stderr("maildir-backup: "), &r.warnings);
    if run.json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
    } else if !run.quiet {
        println!(
            "backed up {} folders, {} messages, {} to {} in {:.2} s (lock held {:.1} ms, {} attempt{}; {} changes during the backup)",
            r.folders,
            r.messages,
            human_bytes(r.bytes),
            r.destination.display(),
            r.seconds,
            r.lock_hold_ms,
            r.lock_attempts,
            if r.lock_attempts == 1 { "" } else { "s" },
            r.changed_during_backup
        );
    }
}

impl BackupArgs {
    /// The source and the destination the arguments name.
    fn paths(&self) -> Result<(MailLocation, Destination), Failure> {
        let want_rest = if self.repo.is_some() { 0 } else { 1 };
        let (source, rest) = self.source.resolve(&self.paths, want_rest)?;
        let dest = match &self.repo {
            Some(repo) => {
                let options = SnapshotOptions { paranoid: self.paranoid, imap_view: self.imap_view };
                Destination::repo(repo.clone(), self.name.clone(), &source, options)?
            }
            None => Destination::Dir(PathBuf::from(&rest[0])),
        };
        Ok((source, dest))
    }

    /// Where the metrics go, under the series name or else the user's directory name.
    fn metrics(&self, source: &MailLocation) -> Result<Option<Metrics>, Failure> {
        let Some(file) = &self.metrics else { return Ok(None) };
        let user = self.name.clone().or_else(|| repo::default_name(&source.root));
        let user = user.ok_or_else(|| Failure::usage(format!("cannot name the user of {} in the metrics; give --name", source.root.display())))?;
        Ok(Some(Metrics { file: file.clone(), user }))
    }
}

pub fn run_backup(a: BackupArgs) -> Outcome {
    let (source, dest) = a.paths()?;
    let metrics = a.metrics(&source)?;
    let bar = a.run.progress();
    let messages = if a.link { MessageFiles::Link { checksums: a.checksum } } else { MessageFiles::Copy };
    let result = job::run_backup(&source, &OnDisk, &dest, &a.run.options(messages), &bar, metrics.as_ref());
    drop(bar);
    warnings::emit_deferred(&Stderr("maildir-backup: "));
    print_report(&result?, &a.run);
    Ok(sysexits::EX_OK)
}

/// Snapshot a live Maildir with hard links at a stable path, run an offsite tool (restic,
/// borg) in it, then remove it.
#[derive(Args, Debug)]
#[command(after_help = "COMMAND runs in the stage directory with MAILDIR_BACKUP_USER, MAILDIR_BACKUP_TIME (the snapshot's \
instant, RFC 3339) and MAILDIR_BACKUP_STAGE set, e.g.\n  maildir-backup hand-off /srv/mail/alice/Maildir --stage /srv/mail/.stage/alice -- \
restic -r /srv/restic backup --ignore-ctime --tag alice .\nIts exit status becomes ours when it fails.")]
pub struct HandOffArgs {
    /// SOURCE (none with --mail-path).
    #[arg(value_name = "SOURCE", num_args = 0..=1)]
    pub paths: Vec<String>,
    /// Where the snapshot is made: the same path every run (restic and borg recognise unchanged
    /// files by path), on the Maildir's file system. A snapshot an earlier run left there is replaced.
    #[arg(long, value_name = "DIR")]
    pub stage: PathBuf,
    /// The user, for COMMAND's environment [default: the user's directory name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Leave the snapshot at the stage afterwards.
    #[arg(long)]
    pub keep_stage: bool,
    /// Read every message to record its checksum in the snapshot's manifest.
    #[arg(long)]
    pub checksum: bool,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// The program to run and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

pub fn run_hand_off(a: HandOffArgs) -> Outcome {
    let (source, _) = a.source.resolve(&a.paths, 0)?;
    let user = a.name.clone().or_else(|| repo::default_name(&source.root));
    let user = user.ok_or_else(|| Failure::usage(format!("cannot name the user of {}; give --name", source.root.display())))?;
    let h = job::HandOff { stage: a.stage.clone(), user, command: a.command.clone(), keep_stage: a.keep_stage, stdout_to_stderr: false };
    let bar = a.run.progress();
    let result = job::run_hand_off(&source, &OnDisk, &h, &a.run.options(MessageFiles::Link { checksums: a.checksum }), &bar);
    drop(bar);
    warnings::emit_deferred(&Stderr("maildir-backup: "));
    let r = result?;
    if a.run.json || a.run.quiet {
        print_report(&r, &a.run);
    } else {
        warnings::emit(&Stderr("maildir-backup: "), &r.warnings);
        let program = a.command[0].to_string_lossy();
        println!("handed {} folders, {} messages, {} at {} to {program} (lock held {:.1} ms)", r.folders, r.messages, human_bytes(r.bytes), r.destination.display(), r.lock_hold_ms);
    }
    Ok(sysexits::EX_OK)
}

/// Check a backup against its manifest and its dovecot-uidlist files.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The backup (or repository snapshot) directory.
    pub backup: PathBuf,
    #[arg(long, short = 'j', default_value_t = 4)]
    pub jobs: u16,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_verify(a: VerifyArgs) -> Outcome {
    match verify::verify(&a.backup, a.jobs.into()) {
        Err(e) => Err(Failure::new(sysexits::EX_NOINPUT, e.to_string())),
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                println!(
                    "{}: {} folders, {} messages, {}: {}",
                    r.backup.display(),
                    r.folders,
                    r.messages,
                    human_bytes(r.bytes),
                    if r.is_whole() { "whole".to_string() } else { format!("{} problem(s)", r.problems.len()) }
                );
            }
            Ok(if r.is_whole() { 0 } else { 1 })
        }
    }
}
