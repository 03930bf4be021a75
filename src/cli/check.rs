//! `check`: a monitoring plugin in Nagios/Icinga's conventions: one status line with
//! performance data, and the exit status 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use clap::Args;
use maildir_backup::check::{self, shown, CheckOptions, SeriesHealth, State};
use maildir_backup::repo::RepoError;
use maildir_backup::verify::Depth;

use super::args::parse_duration;
use super::Outcome;

/// Check a repository for monitoring: every user's newest snapshot is young enough and
/// verifies, and their last run did not fail.
#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the repository cannot be read).\nCRITICAL: a user's newest snapshot is older than --max-age or does not verify, or a user named\nwith --name has no snapshot. WARNING: a user's last run failed (its newest snapshot is still young\nenough), or the newest snapshot is older than --warn-age.")]
pub struct CheckArgs {
    /// The repository (or one series in it).
    pub repo: PathBuf,
    /// A newest snapshot older than this is CRITICAL (e.g. 26h, 2days, 90m).
    #[arg(long, default_value = "26h", value_parser = parse_duration, value_name = "AGE")]
    pub max_age: Duration,
    /// A newest snapshot older than this is a WARNING.
    #[arg(long, value_parser = parse_duration, value_name = "AGE")]
    pub warn_age: Option<Duration>,
    /// Check only this user's series (repeatable); one with no snapshot is CRITICAL.
    #[arg(long = "name", value_name = "USER")]
    pub names: Vec<String>,
    /// Verify checksums, reading every message of each newest snapshot (default: sizes only).
    #[arg(long)]
    pub deep: bool,
    /// Parallel verify threads.
    #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// After the status line, one line per user.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// The command's status line's prefix.
const SERVICE: &str = "MAILDIR-BACKUP";

pub fn run_check(a: CheckArgs) -> Outcome {
    let opts = CheckOptions {
        max_age: a.max_age,
        warn_age: a.warn_age,
        names: a.names.clone(),
        depth: if a.deep { Depth::Checksums } else { Depth::Sizes },
        jobs: a.jobs.into(),
    };
    let (state, line) = match check::check(&a.repo, &opts, Utc::now()) {
        Ok(users) => {
            let line = status_line(&users, &opts);
            if a.verbose {
                let details: Vec<String> = users.iter().map(user_line).collect();
                (worst(&users), format!("{line}\n{}", details.join("\n")))
            } else {
                (worst(&users), line)
            }
        }
        Err(RepoError::NotARepo(p)) => (State::Critical, format!("no backups in {}", p.display())),
        Err(e) => (State::Unknown, e.to_string()),
    };
    println!("{SERVICE} {}: {line}", state.label());
    Ok(state.exit_code())
}

fn worst(users: &[SeriesHealth]) -> State {
    users.iter().map(|u| u.state).max().unwrap_or(State::Critical)
}

/// What is wrong (or how young the snapshots are), then the performance data.
fn status_line(users: &[SeriesHealth], opts: &CheckOptions) -> String {
    let count = |s: State| users.iter().filter(|u| u.state == s).count();
    let oldest = users.iter().filter_map(|u| u.newest_age).max();
    let text = match worst(users) {
        State::Ok => {
            let youngest = users.iter().filter_map(|u| u.newest_age).min();
            let ages = match (youngest, oldest) {
                (Some(y), Some(o)) if shown(y) != shown(o) => format!("{} to {}", shown(y), shown(o)),
                (_, Some(o)) => shown(o),
                _ => "-".to_string(),
            };
            let how = if opts.depth == Depth::Checksums { "checksums" } else { "sizes" };
            format!("{} users, newest snapshots {ages} old, all verify ({how})", users.len())
        }
        _ => {
            let bad: Vec<String> = users.iter().filter(|u| u.state != State::Ok).take(5).map(|u| format!("{}: {}", u.name, u.problems[0].1)).collect();
            let more = users.iter().filter(|u| u.state != State::Ok).count().saturating_sub(bad.len());
            let more = if more > 0 { format!("; and {more} more") } else { String::new() };
            format!("{}{more}", bad.join("; "))
        }
    };
    let threshold = |d: Option<Duration>| d.map_or(String::new(), |d| d.as_secs().to_string());
    format!(
        "{text} | users={} warning={} critical={} oldest_snapshot_age={}s;{};{};0; messages={};;;0; bytes={}B;;;0;",
        users.len(),
        count(State::Warning),
        count(State::Critical),
        oldest.map_or(0, |d| d.as_secs()),
        threshold(opts.warn_age),
        threshold(Some(opts.max_age)),
        users.iter().map(|u| u.messages).sum::<u64>(),
        users.iter().map(|u| u.bytes).sum::<u64>(),
    )
}

fn user_line(u: &SeriesHealth) -> String {
    let age = u.newest_age.map_or_else(|| "no snapshot".to_string(), |a| format!("newest snapshot {} old", shown(a)));
    let problems: Vec<&str> = u.problems.iter().map(|(_, p)| p.as_str()).collect();
    let tail = if problems.is_empty() { String::new() } else { format!(": {}", problems.join("; ")) };
    format!("{} {}: {age}, {} messages{tail}", u.name, u.state.label(), u.messages)
}
