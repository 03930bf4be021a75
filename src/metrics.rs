//! Per-user backup metrics as a Prometheus node-exporter textfile: one file for all users,
//! each run updating its own user's samples and keeping the others'. The file is replaced
//! whole (a new file renamed over it), so the exporter never reads half of it, and runs that
//! finish together take turns on an flock of its directory, so neither loses the other's user.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::fsx::{Dir, FsError};
use crate::repo::status::LastRun;

/// Thousands of users of ten samples each fit far below this.
const FILE_LIMIT: u64 = 64 << 20;

/// The families we write: name, type, help. A sample of any other name is dropped.
const FAMILIES: &[(&str, &str, &str)] = &[
    ("maildir_backup_last_run_timestamp_seconds", "gauge", "When the user's last backup run finished (Unix time)."),
    ("maildir_backup_last_run_success", "gauge", "1 if the user's last backup run succeeded, else 0."),
    ("maildir_backup_last_run_exit_code", "gauge", "Exit status of the user's last backup run (sysexits; 0 is success)."),
    ("maildir_backup_last_success_timestamp_seconds", "gauge", "When the user's last successful backup finished (Unix time)."),
    ("maildir_backup_duration_seconds", "gauge", "How long the user's last successful backup took."),
    ("maildir_backup_lock_hold_seconds", "gauge", "How long the user's last successful backup held the uidlist locks."),
    ("maildir_backup_messages", "gauge", "Messages in the user's last successful backup."),
    ("maildir_backup_bytes", "gauge", "Bytes of the messages in the user's last successful backup."),
    ("maildir_backup_failures_total", "counter", "Failed backup runs of the user since this file was created."),
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0}: give a file path for the metrics")]
    NoFileName(PathBuf),
    #[error("{path}: flock: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
}

/// `family -> user -> value`.
type Samples = BTreeMap<String, BTreeMap<String, f64>>;

/// Updates `user`'s samples in the textfile `file` with `run`.
pub fn update(file: &Path, user: &str, run: &LastRun) -> Result<(), MetricsError> {
    let name = file.file_name().and_then(OsStr::to_str).ok_or_else(|| MetricsError::NoFileName(file.to_path_buf()))?;
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = Dir::open(parent)?;
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| MetricsError::Lock { path: parent.to_path_buf(), source: e.into() })?;
    let mut samples = match dir.read_small(name, FILE_LIMIT, "metrics file")? {
        Some(text) => parse(&String::from_utf8_lossy(&text)),
        None => Samples::new(),
    };
    apply(&mut samples, user, run);
    let text = render(&samples);
    dir.replace_file(name, 0o644, None, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    Ok(())
}

/// `run`'s values for `user`: the last run's always, a success's counts only on success.
fn apply(samples: &mut Samples, user: &str, run: &LastRun) {
    let mut set = |family: &str, v: f64| {
        samples.entry(family.to_string()).or_default().insert(user.to_string(), v);
    };
    set("maildir_backup_last_run_timestamp_seconds", run.finished as f64);
    set("maildir_backup_last_run_success", if run.ok { 1.0 } else { 0.0 });
    set("maildir_backup_last_run_exit_code", run.exit_code.into());
    if run.ok {
        set("maildir_backup_last_success_timestamp_seconds", run.finished as f64);
        set("maildir_backup_duration_seconds", run.seconds);
        set("maildir_backup_lock_hold_seconds", run.lock_hold_ms / 1000.0);
        set("maildir_backup_messages", run.messages as f64);
        set("maildir_backup_bytes", run.bytes as f64);
    }
    let failures = samples.entry("maildir_backup_failures_total".to_string()).or_default().entry(user.to_string()).or_insert(0.0);
    if !run.ok {
        *failures += 1.0;
    }
}

/// The text format: each family's HELP and TYPE once, then its samples by user.
fn render(samples: &Samples) -> String {
    let mut out = String::new();
    for (family, kind, help) in FAMILIES {
        let Some(by_user) = samples.get(*family).filter(|m| !m.is_empty()) else { continue };
        out.push_str(&format!("# HELP {family} {help}\n# TYPE {family} {kind}\n"));
        for (user, v) in by_user {
            out.push_str(&format!("{family}{{user=\"{}\"}} {v}\n", escape(user)));
        }
    }
    out
}

/// Our own samples from an earlier file; anything else (comments, other families, lines
/// that do not parse) is dropped.
fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines() {
        if let Some((family, user, v)) = parse_sample(line) {
            if FAMILIES.iter().any(|(f, ..)| *f == family) {
                samples.entry(family.to_string()).or_default().insert(user, v);
            }
        }
    }
    samples
}

/// `family{user="…"} value`.
fn parse_sample(line: &str) -> Option<(&str, String, f64)> {
    let (family, rest) = line.split_once("{user=\"")?;
    let (user, rest) = unescape_until_quote(rest)?;
    let value = rest.strip_prefix('}')?.trim();
    Some((family, user, value.parse().ok()?))
}

/// A label value: backslash, double quote and newline escaped, as the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The escaped label value up to its closing quote, and what follows the quote.
fn unescape_until_quote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                e @ ('\\' | '"') => out.push(e),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_run(finished: i64) -> LastRun {
        LastRun { started: finished - 3, finished, ok: true, seconds: 3.5, lock_hold_ms: 4.0, messages: 7, bytes: 900, ..Default::default() }
    }

    #[test]
    fn users_are_kept_apart_and_failures_keep_the_last_success() {
        let mut s = Samples::new();
        apply(&mut s, "alice", &ok_run(100));
        apply(&mut s, "bob \"the\" \\admin\\\n", &ok_run(200));
        apply(&mut s, "alice", &LastRun::failed(300, 301, 75, "busy"));
        let again = parse(&render(&s));
        assert_eq!(again, s);
        let alice = |f: &str| again[f]["alice"];
        assert_eq!(alice("maildir_backup_last_success_timestamp_seconds"), 100.0);
        assert_eq!(alice("maildir_backup_last_run_timestamp_seconds"), 301.0);
        assert_eq!(alice("maildir_backup_last_run_success"), 0.0);
        assert_eq!(alice("maildir_backup_last_run_exit_code"), 75.0);
        assert_eq!(alice("maildir_backup_failures_total"), 1.0);
        assert_eq!(alice("maildir_backup_lock_hold_seconds"), 0.004);
        assert_eq!(again["maildir_backup_failures_total"]["bob \"the\" \\admin\\\n"], 0.0);
    }

    #[test]
    fn foreign_and_broken_lines_are_dropped() {
        let s = parse("# HELP x y\nnode_load1 3\nmaildir_backup_messages{user=\"a\"} 5\nmaildir_backup_messages{user=\"b} 5\nmaildir_backup_bogus{user=\"a\"} 1\nmaildir_backup_bytes{user=\"a\\q\"} 1\n");
        assert_eq!(s.len(), 1);
        assert_eq!(s["maildir_backup_messages"].len(), 1);
    }
}
