//! `snapshots`, `prune` and `restore`.

use std::path::PathBuf;

use chrono::Utc;
use clap::Args;
use maildir_backup::dotlock::LockSettings;
use maildir_backup::manifest::Manifest;
use maildir_backup::repo::{self, KeepPolicy};
use maildir_backup::restore::{self, RestoreRequest};
use maildir_backup::sysexits::{self, ExitCode};

use super::backup::{human_bytes, SourceArgs};
use super::parse_secs;

/// List the snapshots of a repository (or of one name in it).
#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// REPO or REPO/NAME.
    pub path: PathBuf,
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

pub fn run_snapshots(a: SnapshotsArgs) -> i32 {
    let series = match repo::series_under(&a.path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("maildir-backup snapshots: {e}");
            return e.exit_code();
        }
    };
    let mut rows = Vec::new();
    for s in series {
        let snaps = match s.snapshots() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("maildir-backup snapshots: {e}");
                return e.exit_code();
            }
        };
        for snap in snaps {
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
    0
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
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_daily: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: usize,
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run_prune(a: PruneArgs) -> i32 {
    let policy = KeepPolicy { last: a.keep_last, daily: a.keep_daily, weekly: a.keep_weekly, monthly: a.keep_monthly };
    let series = match repo::series_under(&a.path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("maildir-backup prune: {e}");
            return e.exit_code();
        }
    };
    let mut code = 0;
    for s in series {
        let snaps = match s.snapshots() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("maildir-backup prune: {e}");
                code = e.exit_code();
                continue;
            }
        };
        let (keep, remove) = repo::plan_prune(&snaps, policy);
        for k in &keep {
            println!("keep   {}", k.path.display());
        }
        for r in &remove {
            if a.dry_run {
                println!("would remove {}", r.path.display());
            } else if let Err(e) = repo::remove_snapshot(&s.dir, r) {
                eprintln!("maildir-backup prune: {e}");
                code = e.exit_code();
            } else {
                println!("removed {}", r.path.display());
            }
        }
    }
    code
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
    /// Seconds to wait for each target folder's lock.
    #[arg(long, default_value = "122", value_parser = parse_secs, value_name = "SECS")]
    pub lock_timeout: std::time::Duration,
    #[arg(long)]
    pub json: bool,
}

pub fn run_restore(a: RestoreArgs) -> i32 {
    // SNAPSHOT comes first; the target is the rest (or the --mail-path options).
    let snapshot = PathBuf::from(&a.paths[0]);
    let (target, _) = match a.target.resolve(&a.paths[1..], 0) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("maildir-backup restore: {e}");
            return sysexits::EX_USAGE;
        }
    };
    let req = RestoreRequest {
        folders: a.folder,
        messages: a.message,
        uids: a.uid,
        dry_run: a.dry_run,
        lock: LockSettings { timeout: a.lock_timeout, ..LockSettings::default() },
    };
    match restore::restore(&snapshot, &target, &req) {
        Ok(r) => {
            for w in &r.warnings {
                eprintln!("maildir-backup restore: warning: {w}");
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                if a.dry_run {
                    for act in &r.actions {
                        println!("{act}");
                    }
                }
                println!(
                    "{} restore into {}: {} {}, {} skipped (already there), {} folder(s) created",
                    r.mode,
                    target.root.display(),
                    r.restored,
                    if a.dry_run { "would be restored" } else { "restored" },
                    r.skipped,
                    r.folders_created
                );
            }
            0
        }
        Err(e) => {
            eprintln!("maildir-backup restore: {e}");
            e.exit_code()
        }
    }
}
