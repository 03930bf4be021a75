//! `all-users`: a doveadm mail command for every user, one doveadm per user (see
//! [`maildir_backup::job::all_users`]). Standard output carries the command's rows as
//! `doveadm -f tab … -A` would (or one JSON object per user); standard error each user that
//! failed, and a summary with users per second.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use maildir_backup::job::all_users::{self, AllUsers, Summary, UserRun, Users};

use super::args::parse_duration;
use super::Outcome;

/// Run a doveadm mail command for every user, one doveadm process per user, several at once,
/// each with a time limit: the nightly run over a cluster, where `doveadm -A` through a proxy
/// can hang or stop at the first backend that is down.
#[derive(Args, Debug)]
#[command(after_help = "Example, on a proxy that routes each user to its backend:\n  maildir-backup all-users -j 8 --user-timeout 2h -- maildir-backup -t 30 repo:/var/backups/maildir-backup\n\nExit status: 0 if the command succeeded for every user; else the exit status of the first user\n(in list order) it did not succeed for (75 for one stopped at its time limit).")]
pub struct AllUsersArgs {
    /// Users from this file, one per line, instead of the userdb's.
    #[arg(short = 'F', long = "user-file", value_name = "FILE", conflicts_with = "masks")]
    pub user_file: Option<PathBuf>,
    /// Only the userdb's users matching MASK (`*` and `?` wildcards; repeatable).
    #[arg(short = 'u', long = "user", value_name = "MASK")]
    pub masks: Vec<String>,
    /// Users run at once.
    #[arg(short = 'j', long = "parallel", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub parallel: u16,
    /// How long one user may take (e.g. 2h, 90m; 0 for no limit): then its doveadm is stopped,
    /// and the user counts as failed (75).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub user_timeout: Duration,
    /// doveadm's configuration file (doveadm -c).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A setting for every doveadm run (doveadm -o; repeatable).
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    /// The doveadm program.
    #[arg(long, value_name = "PROGRAM", default_value = "doveadm")]
    pub doveadm: PathBuf,
    /// One JSON object per user on standard output (user, result, exit, seconds, errors, rows).
    #[arg(long)]
    pub json: bool,
    /// The doveadm command and its arguments, after `--`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

pub fn run_all_users(a: AllUsersArgs) -> Outcome {
    let mut doveadm: Vec<OsString> = vec![a.doveadm.into()];
    if let Some(c) = a.config {
        doveadm.extend(["-c".into(), c.into()]);
    }
    for s in a.settings {
        doveadm.extend(["-o".into(), s.into()]);
    }
    let users = match a.user_file {
        Some(f) => Users::File(f),
        None if a.masks.is_empty() => Users::Matching(vec!["*".to_string()]),
        None => Users::Matching(a.masks),
    };
    let timeout = Some(a.user_timeout).filter(|t| !t.is_zero());
    let job = AllUsers { doveadm, command: a.command, parallel: a.parallel.into(), timeout };
    let users = all_users::list_users(&job.doveadm, &users)?;
    let mut table = Table::default();
    let summary = all_users::run(&job, &users, |r| {
        if a.json {
            println!("{}", json_line(r));
        } else {
            table.print(r);
        }
        for e in r.errors.iter().filter(|_| r.outcome != all_users::Outcome::Ok) {
            eprintln!("maildir-backup all-users: {}: {e}", r.user);
        }
        let _ = std::io::stdout().flush();
    });
    eprintln!("{}", summary_line(&summary));
    Ok(summary.exit)
}

/// doveadm's rows under one header: the first a user's run printed, with a `user` column in
/// front if the command has none (as doveadm -A does through a proxy).
#[derive(Default)]
struct Table {
    header: Option<Vec<String>>,
}

impl Table {
    fn print(&mut self, r: &UserRun) {
        if r.header.is_empty() {
            return;
        }
        let has_user = matches!(r.header.first().map(String::as_str), Some("user" | "username"));
        if self.header.is_none() {
            let header: Vec<String> = if has_user { r.header.clone() } else { std::iter::once("user".to_string()).chain(r.header.iter().cloned()).collect() };
            println!("{}", header.join("\t"));
            self.header = Some(header);
        }
        for row in &r.rows {
            if has_user {
                println!("{}", row.join("\t"));
            } else {
                println!("{}\t{}", r.user, row.join("\t"));
            }
        }
    }
}

fn json_line(r: &UserRun) -> String {
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        r.rows.iter().map(|row| r.header.iter().cloned().zip(row.iter().map(|c| serde_json::Value::from(c.as_str()))).collect()).collect();
    serde_json::json!({
        "user": r.user,
        "result": r.outcome.as_str(),
        "exit": r.exit,
        "seconds": (r.seconds * 1000.0).round() / 1000.0,
        "errors": r.errors,
        "rows": rows,
    })
    .to_string()
}

fn summary_line(s: &Summary) -> String {
    let rate = if s.seconds > 0.0 { s.users as f64 / s.seconds } else { 0.0 };
    format!(
        "maildir-backup all-users: {} users in {:.1} s ({rate:.1} users/s): {} ok, {} failed, {} timed out",
        s.users, s.seconds, s.ok, s.failed, s.timed_out
    )
}
