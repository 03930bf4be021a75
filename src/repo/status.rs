//! The record of a series' last backup run, `REPO/<name>/last-run.json`: written after every
//! run into a repository, failed or not, so that `check` can tell "failed last night" from
//! "never ran", and carrying the counts the metrics report. Read as untrusted input: bounded,
//! a regular file only, and a record that does not parse is reported, never trusted.

use std::path::PathBuf;

use crate::fsx::{Dir, FsError};

/// The record's name in a series directory (not a snapshot name, so never listed as one).
pub const LAST_RUN: &str = "last-run.json";
/// A record is a few hundred bytes; an error message is bounded below.
const RECORD_LIMIT: u64 = 64 * 1024;
const ERROR_LIMIT: usize = 4096;

/// One run's outcome, and the history `check` and the metrics need.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LastRun {
    /// Unix times the run started and finished.
    pub started: i64,
    pub finished: i64,
    pub ok: bool,
    /// The run's exit status (sysexits: 0 for success).
    pub exit_code: i32,
    /// Why it failed.
    pub error: Option<String>,
    /// The snapshot it made.
    pub snapshot: Option<String>,
    pub seconds: f64,
    pub lock_hold_ms: f64,
    pub messages: u64,
    pub bytes: u64,
    pub warnings: u64,
    /// Unix time of the last run that succeeded (this one or an earlier one).
    pub last_success: Option<i64>,
    /// Failed runs in a row up to this one (0 after a success).
    pub failures_in_a_row: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: not a run record: {why}")]
    Unreadable { path: PathBuf, why: String },
}

impl LastRun {
    /// A failed run: `error` shortened to a bounded length.
    pub fn failed(started: i64, finished: i64, exit_code: i32, error: &str) -> LastRun {
        let mut error = error.to_string();
        if error.len() > ERROR_LIMIT {
            let mut cut = ERROR_LIMIT;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
            error.push('…');
        }
        LastRun { started, finished, ok: false, exit_code, error: Some(error), ..Default::default() }
    }

    /// This run, carrying on the history of `previous` (the series' record before it).
    pub fn after(mut self, previous: Option<&LastRun>) -> LastRun {
        if self.ok {
            self.last_success = Some(self.finished);
            self.failures_in_a_row = 0;
        } else {
            self.last_success = previous.and_then(|p| p.last_success);
            self.failures_in_a_row = previous.map_or(0, |p| p.failures_in_a_row) + 1;
        }
        self
    }
}

/// The series' record, None if it has none.
pub fn read(series: &Dir) -> Result<Option<LastRun>, StatusError> {
    let Some(bytes) = series.read_small(LAST_RUN, RECORD_LIMIT, "run record")? else { return Ok(None) };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| StatusError::Unreadable { path: series.show(LAST_RUN), why: e.to_string() })
}

/// Replaces the series' record with `run` (a new file renamed over the old one, flushed).
pub fn write(series: &Dir, run: &LastRun) -> Result<(), StatusError> {
    let json = serde_json::to_vec_pretty(run).map_err(|e| StatusError::Unreadable { path: series.show(LAST_RUN), why: e.to_string() })?;
    series.replace_file(LAST_RUN, 0o600, None, |f| std::io::Write::write_all(f, &json))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_carries_over_failures_and_the_last_success() {
        let ok = LastRun { started: 10, finished: 20, ok: true, ..Default::default() }.after(None);
        assert_eq!((ok.last_success, ok.failures_in_a_row), (Some(20), 0));
        let f1 = LastRun::failed(30, 31, 75, "busy").after(Some(&ok));
        let f2 = LastRun::failed(40, 41, 75, &"x".repeat(10_000)).after(Some(&f1));
        assert_eq!((f2.last_success, f2.failures_in_a_row), (Some(20), 2));
        assert!(f2.error.as_ref().unwrap().len() <= ERROR_LIMIT + '…'.len_utf8());
        let again = LastRun { started: 50, finished: 60, ok: true, ..Default::default() }.after(Some(&f2));
        assert_eq!((again.last_success, again.failures_in_a_row), (Some(60), 0));
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        assert_eq!(read(&dir).unwrap(), None);
        let run = LastRun::failed(1, 2, 74, "disk on fire").after(None);
        write(&dir, &run).unwrap();
        assert_eq!(read(&dir).unwrap(), Some(run));
        std::fs::write(t.path().join(LAST_RUN), b"{\"ok\": tru").unwrap();
        assert!(matches!(read(&dir), Err(StatusError::Unreadable { .. })));
        std::fs::remove_file(t.path().join(LAST_RUN)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join(LAST_RUN)).unwrap();
        assert!(matches!(read(&dir), Err(StatusError::Fs(_))));
    }
}
