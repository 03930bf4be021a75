//! Subcommands of the CLI.

mod backup;
mod lock;
mod repo;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "maildir-backup", version, about = "Consistent, live backups of Dovecot Maildirs")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Backup(backup::BackupArgs),
    Verify(backup::VerifyArgs),
    Snapshots(repo::SnapshotsArgs),
    Restore(repo::RestoreArgs),
    Prune(repo::PruneArgs),
    Lock(lock::LockArgs),
    Maildirlock(lock::MaildirlockArgs),
}

pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Backup(a) => backup::run_backup(a),
        Command::Verify(a) => backup::run_verify(a),
        Command::Snapshots(a) => repo::run_snapshots(a),
        Command::Restore(a) => repo::run_restore(a),
        Command::Prune(a) => repo::run_prune(a),
        Command::Lock(a) => lock::run_lock(a),
        Command::Maildirlock(a) => lock::run_maildirlock(a),
    }
}

/// Parses seconds, fractions allowed ("0.5", "120").
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("'{s}' is not a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(v).map_err(|_| format!("'{s}' seconds is too large"))
}
