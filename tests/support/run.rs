//! One finished command for every test: [`Run`] (status, captured output, time, command line), the CLI
//! under test ([`BIN`], [`cli`]) and the sysexits codes, taken from the library so tests and product
//! cannot disagree.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use maildir_backup::sysexits::{
    EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_NOPERM, EX_NOUSER, EX_OK,
    EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE,
};

/// The CLI under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_maildir-backup");

/// The CLI for helpers that may be pointed at another build: `MB_CLI_BIN` if set, else [`BIN`].
pub fn cli_bin() -> PathBuf {
    std::env::var_os("MB_CLI_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(BIN))
}

/// One finished command.
pub struct Run {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// A [`Run`] from a finished process started at `started`.
    pub fn finish(cmdline: String, started: Instant, out: Output) -> Run {
        Run {
            cmdline,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    /// Runs `cmd` to completion (no time limit, stdin null, output through pipes).
    pub fn of(mut cmd: Command) -> Run {
        let cmdline = format!("{cmd:?}");
        let started = Instant::now();
        let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {cmdline}: {e}"));
        Run::finish(cmdline, started, out)
    }

    /// The exit code; None if killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Everything about the run, for assertion messages.
    pub fn show(&self) -> String {
        format!(
            "$ {}\n{} after {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.status, self.elapsed, self.stdout, self.stderr
        )
    }

    /// Panics (with everything) unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code(), Some(code), "unexpected exit code:\n{}", self.show());
        self
    }

    pub fn expect_ok(&self) -> &Run {
        self.expect_code(EX_OK)
    }

    /// Panics unless stderr contains every one of `needles`.
    pub fn expect_stderr(&self, needles: &[&str]) -> &Run {
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}:\n{}", self.show());
        }
        self
    }

    /// stdout parsed as JSON (panics with everything if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.show()))
    }

    /// doveadm's `-f json` output as rows of field → value.
    pub fn json_rows(&self) -> Vec<BTreeMap<String, String>> {
        json_rows(&self.stdout).unwrap_or_else(|e| panic!("{e}\n{}", self.show()))
    }
}

/// Parses doveadm's `-f json` output: an array of objects whose values are strings (or numbers).
pub fn json_rows(stdout: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|e| format!("doveadm -f json output does not parse: {e}"))?;
    let arr = v.as_array().ok_or("doveadm -f json output is not an array")?;
    arr.iter()
        .map(|row| {
            let obj = row.as_object().ok_or_else(|| format!("row {row} is not an object"))?;
            obj.iter()
                .map(|(k, v)| {
                    let s = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        other => return Err(format!("field {k} of row {row}: unexpected {other}")),
                    };
                    Ok((k.clone(), s))
                })
                .collect()
        })
        .collect()
}

/// Runs `maildir-backup ARGS...`.
pub fn cli<S: AsRef<OsStr>>(args: &[S]) -> Run {
    cli_env(args, &[])
}

/// Runs `maildir-backup ARGS...` with extra environment variables.
pub fn cli_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &OsStr)]) -> Run {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    let cmdline = std::iter::once("maildir-backup".to_string())
        .chain(args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    Run::finish(cmdline, started, out)
}

/// [`cli`], panicking unless it exits 0.
pub fn cli_ok<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let r = cli(args);
    r.expect_ok();
    r
}
