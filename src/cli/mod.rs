//! The subcommands. Each `run_*` returns its exit code or a [`Failure`], which `run` prints,
//! once, as `maildir-backup <command>: <why>`.

mod all_users;
mod args;
mod backup;
mod check;
mod docs;
mod lock;
mod repo;

use clap::{Parser, Subcommand};
use maildir_backup::sysexits::{self, ExitCode};
use maildir_backup::warnings::Sink;

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
    HandOff(backup::HandOffArgs),
    AllUsers(all_users::AllUsersArgs),
    Snapshots(repo::SnapshotsArgs),
    Restore(repo::RestoreArgs),
    Prune(repo::PruneArgs),
    Check(check::CheckArgs),
    #[command(hide = true)]
    GenerateDocs(docs::GenerateDocsArgs),
    Lock(lock::LockArgs),
    Maildirlock(lock::MaildirlockArgs),
}

/// A command that failed: why, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(sysexits::EX_USAGE, message)
    }
}

impl<E: std::error::Error + ExitCode> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::new(e.exit_code(), e.to_string())
    }
}

/// An exit code, or why the command failed.
pub type Outcome = Result<i32, Failure>;

/// Warnings on stderr, each after `prefix`.
pub struct Stderr(pub &'static str);

impl Sink for Stderr {
    fn warn(&self, message: &str) {
        eprintln!("{}{message}", self.0);
    }
}

pub fn run(cli: Cli) -> i32 {
    let (name, outcome) = match cli.command {
        Command::Backup(a) => ("maildir-backup backup", backup::run_backup(a)),
        Command::Verify(a) => ("maildir-backup verify", backup::run_verify(a)),
        Command::HandOff(a) => ("maildir-backup hand-off", backup::run_hand_off(a)),
        Command::AllUsers(a) => ("maildir-backup all-users", all_users::run_all_users(a)),
        Command::Snapshots(a) => ("maildir-backup snapshots", repo::run_snapshots(a)),
        Command::Restore(a) => ("maildir-backup restore", repo::run_restore(a)),
        Command::Prune(a) => ("maildir-backup prune", repo::run_prune(a)),
        Command::Check(a) => ("maildir-backup check", check::run_check(a)),
        Command::GenerateDocs(a) => ("maildir-backup generate-docs", docs::run_generate_docs(a)),
        Command::Lock(a) => ("maildir-backup lock", lock::run_lock(a)),
        Command::Maildirlock(a) => ("maildirlock", lock::run_maildirlock(a)),
    };
    outcome.unwrap_or_else(|f| {
        eprintln!("{name}: {}", f.message);
        f.code
    })
}
