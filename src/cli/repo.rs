//! `snapshots`, `prune` and `restore`.

use std::path::PathBuf;

use chrono::Utc;
use clap::Args;
use maildir_backup::job::{self, RestorePlan, SnapshotRef};
use maildir_backup::manifest::Manifest;
use maildir_backup::repo::{self, imap_view, KeepPolicy, Series};
use maildir_backup::restore::{RestoreReport, RestoreRequest};
use maildir_backup::sysexits::ExitCode;
use maildir_backup::warnings;

use super::args::{SourceArgs, UidlistLockArgs};
use super::backup::human_bytes;
use super::{Outcome, Stderr};

/// List the snapshots of a repository (or of one name in it).
#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// REPO or REPO/NAME.
    pub path: PathBuf,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct SnapshotRow {
    name: String,
    snapshot: String,
    path: PathBuf,
    messages: u64,
    bytes: u64,
    new_bytes: u64,
    age_seconds: i64,
}

pub fn run_snapshots(a: SnapshotsArgs) -> Outcome {
    let mut rows = Vec::new();
    for s in repo::series_under(&a.path)? {
        rows.extend(snapshot_rows(&s)?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
    } else {
        println!("{:<20} {:<20} {:>10} {:>12} {:>12} {:>10}", "NAME", "SNAPSHOT", "MESSAGES", "SIZE", "NEW", "AGE");
        for r in &rows {
            println!(
                "{:<20} {:<20} {:>10} {:>12} {:>12} {:>10}",
                r.name,
                r.snapshot,
                r.messages,
                human_bytes(r.bytes),
                human_bytes(r.new_bytes),
                human_age(r.age_seconds)
            );
        }
    }
    Ok(0)
}

/// A row per snapshot of `s`, sized from its manifest's header (zeros if unreadable).
fn snapshot_rows(s: &Series) -> Result<Vec<SnapshotRow>, repo::RepoError> {
    let mut rows = Vec::new();
    for snap in s.snapshots()? {
        let header = s.dir.sub(&snap.name).ok().and_then(|d| Manifest::read_header(&d).ok());
        rows.push(SnapshotRow {
            name: s.name.clone(),
            snapshot: snap.name.clone(),
            messages: header.as_ref().map_or(0, |h| h.messages),
            bytes: header.as_ref().map_or(0, |h| h.bytes),
            new_bytes: header.as_ref().map_or(0, |h| h.bytes_copied),
            age_seconds: (Utc::now() - snap.time).num_seconds(),
            path: snap.path,
        });
    }
    Ok(rows)
}

fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Remove old snapshots by a retention policy (the newest is always kept).
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// REPO or REPO/NAME.
    pub path: PathBuf,
    #[command(flatten)]
    pub keep: KeepPolicy,
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run_prune(a: PruneArgs) -> Outcome {
    let mut code = 0;
    for s in repo::series_under(&a.path)? {
        let done = prune_series(&s, a.keep, a.dry_run).unwrap_or_else(|e| {
            eprintln!("maildir-backup prune: {e}");
            e.exit_code()
        });
        code = if done == 0 { code } else { done };
    }
    Ok(code)
}

/// Prunes one series, printing what it keeps and removes. Goes on past a snapshot it cannot
/// remove (said on stderr): returns 0, or the exit code of the last such failure.
fn prune_series(s: &Series, keep: KeepPolicy, dry_run: bool) -> Result<i32, repo::RepoError> {
    if !dry_run {
        let finished = repo::finish_interrupted_removals(&s.dir)?;
        if finished > 0 {
            println!("finished {finished} removal(s) an interrupted prune left in {}", s.dir.path().display());
        }
    }
    let (kept, doomed) = repo::plan_prune(&s.snapshots()?, keep);
    for k in &kept {
        println!("keep   {}", k.path.display());
    }
    let mut code = 0;
    if !dry_run {
        // Out of the IMAP view before they go, so no one opens a snapshot being removed.
        let oldest_first: Vec<_> = kept.iter().rev().cloned().collect();
        match imap_view::refresh(&s.dir, &oldest_first, false) {
            Ok(Some(c)) => c.warnings.iter().for_each(|w| eprintln!("maildir-backup prune: warning: {w}")),
            Ok(None) => {}
            Err(e) => {
                eprintln!("maildir-backup prune: the IMAP view of {} was not updated: {e}", s.dir.path().display());
                code = e.exit_code();
            }
        }
    }
    for r in &doomed {
        if dry_run {
            println!("would remove {}", r.path.display());
        } else if let Err(e) = repo::remove_snapshot(&s.dir, r) {
            eprintln!("maildir-backup prune: {e}");
            code = e.exit_code();
        } else {
            println!("removed {}", r.path.display());
        }
    }
    if !dry_run {
        match repo::remove_unused_entries(&s.dir) {
            Ok(Some(0)) => {}
            Ok(Some(n)) => println!("{n} store entr{} no snapshot uses deleted from {}", if n == 1 { "y" } else { "ies" }, s.dir.path().display()),
            Ok(None) => println!("a snapshot is running in {}: its store's unused entries are left for the next prune", s.dir.path().display()),
            Err(e) => {
                eprintln!("maildir-backup prune: {e}");
                code = e.exit_code();
            }
        }
    }
    Ok(code)
}

/// Restore a backup or snapshot into a (possibly live) Maildir: a full restore into an empty
/// target, otherwise a merge that never overwrites or deletes anything.
#[derive(Args, Debug)]
#[command(after_help = "TARGET is a Maildir path or a Dovecot 2.3 mail_location; with --mail-path (Dovecot 2.4 terms) give only SNAPSHOT.")]
pub struct RestoreArgs {
    /// SNAPSHOT and TARGET (only SNAPSHOT with --mail-path).
    #[arg(value_name = "SNAPSHOT TARGET", num_args = 1..=2, required = true)]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub target: SourceArgs,
    /// Restore this folder (repeatable).
    #[arg(long, value_name = "NAME")]
    pub folder: Vec<String>,
    /// Restore the message with this unique name (repeatable).
    #[arg(long, value_name = "UNIQUE-NAME")]
    pub message: Vec<String>,
    /// Restore the message with this UID in the snapshot's folder (repeatable).
    #[arg(long, value_name = "FOLDER:UID")]
    pub uid: Vec<String>,
    /// Only list what would be restored or skipped.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub lock: UidlistLockArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_restore(a: RestoreArgs) -> Outcome {
    // SNAPSHOT comes first; the target is the rest (or the --mail-path options).
    let (target, _) = a.target.resolve(&a.paths[1..], 0)?;
    let plan = RestorePlan {
        snapshot: SnapshotRef::Path(PathBuf::from(&a.paths[0])),
        target,
        request: RestoreRequest { folders: a.folder, messages: a.message, uids: a.uid, dry_run: a.dry_run, lock: a.lock.settings() },
    };
    let result = job::run_restore(&plan);
    let sink = Stderr("maildir-backup restore: warning: ");
    warnings::emit_deferred(&sink);
    let r = result?;
    warnings::emit(&sink, &r.warnings);
    print_restore(&r, &plan, a.json);
    Ok(0)
}

fn print_restore(r: &RestoreReport, plan: &RestorePlan, json: bool) {
    let dry_run = plan.request.dry_run;
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    if dry_run {
        for act in &r.actions {
            println!("{act}");
        }
    }
    println!(
        "{} restore into {}: {} {}, {} skipped (already there), {} folder(s) created",
        r.mode,
        plan.target.root.display(),
        r.restored,
        if dry_run { "would be restored" } else { "restored" },
        r.skipped,
        r.folders_created
    );
}
