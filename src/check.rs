//! `check`: a repository's health for monitoring. For every series (user), or the ones
//! named: its newest snapshot is young enough and verifies, and its last run did not fail.
//! The states are Nagios/Icinga's; the front end words them.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::repo::status::{self, LastRun};
use crate::repo::{self, RepoError, Series};
use crate::verify::{self, Depth};

/// A check's result, in the order of severity (exit codes 0, 1, 2, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl State {
    pub fn exit_code(self) -> i32 {
        self as i32
    }
    pub fn label(self) -> &'static str {
        ["OK", "WARNING", "CRITICAL", "UNKNOWN"][self as usize]
    }
}

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// A newest snapshot older than this is critical.
    pub max_age: Duration,
    /// A newest snapshot older than this is a warning.
    pub warn_age: Option<Duration>,
    /// Only these series (each must exist); empty: all in the repository.
    pub names: Vec<String>,
    pub depth: Depth,
    pub jobs: usize,
}

/// One series' health.
#[derive(Debug, Clone)]
pub struct SeriesHealth {
    pub name: String,
    pub state: State,
    /// Why it is not OK, worst first.
    pub problems: Vec<(State, String)>,
    pub newest_age: Option<Duration>,
    pub messages: u64,
    pub bytes: u64,
}

/// The health of every series in `path` (a repository or one series), or of `names`.
pub fn check(path: &Path, opts: &CheckOptions, now: DateTime<Utc>) -> Result<Vec<SeriesHealth>, RepoError> {
    let all = match repo::series_under(path) {
        Err(RepoError::NotARepo(_)) if !opts.names.is_empty() => Vec::new(),
        r => r?,
    };
    if opts.names.is_empty() {
        return Ok(all.iter().map(|s| check_series(Some(s), &s.name, opts, now)).collect());
    }
    Ok(opts.names.iter().map(|n| check_series(all.iter().find(|s| &s.name == n), n, opts, now)).collect())
}

fn check_series(series: Option<&Series>, name: &str, opts: &CheckOptions, now: DateTime<Utc>) -> SeriesHealth {
    let mut h = SeriesHealth { name: name.to_string(), state: State::Ok, problems: Vec::new(), newest_age: None, messages: 0, bytes: 0 };
    let Some(series) = series else {
        h.flag(State::Critical, "never backed up".to_string());
        return h;
    };
    match series.snapshots() {
        Err(e) => h.flag(State::Critical, format!("cannot list its snapshots: {e}")),
        Ok(snaps) => match snaps.last() {
            None => h.flag(State::Critical, "no snapshot".to_string()),
            Some(newest) => {
                let age = (now - newest.time).to_std().unwrap_or_default();
                h.newest_age = Some(age);
                if age > opts.max_age {
                    h.flag(State::Critical, format!("newest snapshot {} is {} old (critical over {})", newest.name, shown(age), shown(opts.max_age)));
                } else if opts.warn_age.is_some_and(|w| age > w) {
                    h.flag(State::Warning, format!("newest snapshot {} is {} old (warning over {})", newest.name, shown(age), shown(opts.warn_age.unwrap_or_default())));
                }
                h.verify(&newest.path, opts);
            }
        },
    }
    match status::read(&series.dir) {
        Ok(Some(run)) if !run.ok => h.flag(State::Warning, failed_run(&run)),
        Ok(_) => {}
        Err(e) => h.flag(State::Warning, e.to_string()),
    }
    h
}

impl SeriesHealth {
    fn flag(&mut self, state: State, why: String) {
        self.state = self.state.max(state);
        self.problems.push((state, why));
        self.problems.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    }

    fn verify(&mut self, snapshot: &Path, opts: &CheckOptions) {
        match verify::verify_to(snapshot, opts.jobs, opts.depth) {
            Err(e) => self.flag(State::Critical, e.to_string()),
            Ok(r) => {
                (self.messages, self.bytes) = (r.messages, r.bytes);
                if let Some(first) = r.problems.first() {
                    self.flag(State::Critical, format!("{} does not verify ({} problem(s)): {first}", snapshot.display(), r.problems.len()));
                }
            }
        }
    }
}

fn failed_run(run: &LastRun) -> String {
    let when = Utc.timestamp_opt(run.finished, 0).single().map_or_else(|| run.finished.to_string(), |t| t.format("%Y-%m-%d %H:%M UTC").to_string());
    let why = run.error.as_deref().unwrap_or("no reason recorded");
    let streak = if run.failures_in_a_row > 1 { format!(", {} runs in a row", run.failures_in_a_row) } else { String::new() };
    format!("last run failed at {when} (exit {}{streak}): {why}", run.exit_code)
}

/// A duration to the minute, as people read it ("1day 2h 5m").
pub fn shown(d: Duration) -> String {
    let rounded = Duration::from_secs(d.as_secs() / 60 * 60);
    if rounded.is_zero() { format!("{}s", d.as_secs()) } else { humantime::format_duration(rounded).to_string() }
}
