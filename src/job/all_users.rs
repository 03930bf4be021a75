//! One doveadm mail command for every user, each user in a doveadm process of its own (N at
//! once) with a time limit. doveadm's own `-A` through a proxy with several backends can hang
//! for ever (a Dovecot 2.3 client bug), gives up at the first backend it cannot reach, and
//! passes `-F` on empty; a single `-u` through the same proxy is routed to the user's backend
//! like any other and does none of this. So the users are listed here (`doveadm user MASK`
//! or a file) and sent one by one: a stuck user is stopped at its limit and the others go on.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::sysexits::{self, ExitCode};

/// Most bytes kept of what one doveadm prints (on each of stdout and stderr); the rest is read
/// and dropped, so a chatty run can neither block nor fill our memory.
const OUTPUT_LIMIT: u64 = 16 << 20;
/// Biggest user file read.
const USER_FILE_LIMIT: u64 = 64 << 20;
/// How long a doveadm stopped at its time limit gets to end before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// A command to run for every user.
#[derive(Debug, Clone)]
pub struct AllUsers {
    /// The doveadm program and the options that go before the command (`-c FILE`, `-o K=V`).
    pub doveadm: Vec<OsString>,
    /// The command's name and arguments; `-u USER` is put right after the name.
    pub command: Vec<OsString>,
    /// Users run at once.
    pub parallel: usize,
    /// How long one user may take (None: no limit).
    pub timeout: Option<Duration>,
}

/// Who the command runs for.
#[derive(Debug, Clone)]
pub enum Users {
    /// The userdb's users matching these masks (`*` and `?` wildcards), each listed once.
    Matching(Vec<String>),
    /// The users named in a file, one per line (blank lines and `#` comments skipped).
    File(PathBuf),
}

/// How one user's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    /// Stopped at the time limit.
    TimedOut,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed out",
        }
    }
}

/// One user's run.
#[derive(Debug, Clone)]
pub struct UserRun {
    pub user: String,
    pub outcome: Outcome,
    /// doveadm's exit code (75 for a run stopped at its limit).
    pub exit: i32,
    pub seconds: f64,
    /// What doveadm said on standard error, line by line.
    pub errors: Vec<String>,
    /// The command's table (doveadm `-f tab`): column names, and its rows.
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// All users' runs, summed up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub users: usize,
    pub ok: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub seconds: f64,
    /// The exit code of the first user (in list order) that did not succeed; 0 if all did.
    pub exit: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum AllUsersError {
    #[error("cannot run {program}: {source}")]
    CannotRun { program: String, source: io::Error },
    #[error("listing the users with `{command}` failed ({status}): {stderr}")]
    ListFailed { command: String, status: ExitStatus, stderr: String },
    #[error("read user file {path}: {source}")]
    UserFile { path: PathBuf, source: io::Error },
    #[error("user file {path}, line {line}: {why}")]
    BadUser { path: PathBuf, line: usize, why: &'static str },
    #[error("no users to run the command for")]
    NoUsers,
}

impl ExitCode for AllUsersError {
    fn exit_code(&self) -> i32 {
        match self {
            AllUsersError::CannotRun { .. } => sysexits::EX_UNAVAILABLE,
            AllUsersError::ListFailed { status, .. } => status.code().filter(|c| *c != 0).unwrap_or(sysexits::EX_SOFTWARE),
            AllUsersError::UserFile { source, .. } => sysexits::for_io_error(source),
            AllUsersError::BadUser { .. } => sysexits::EX_DATAERR,
            AllUsersError::NoUsers => sysexits::EX_NOUSER,
        }
    }
}

/// The users `users` names, in order, each once.
pub fn list_users(doveadm: &[OsString], users: &Users) -> Result<Vec<String>, AllUsersError> {
    let mut out = match users {
        Users::File(path) => read_user_file(path)?,
        Users::Matching(masks) => {
            let mut all = Vec::new();
            for mask in masks {
                all.extend(userdb_users(doveadm, mask)?);
            }
            all
        }
    };
    let mut seen = std::collections::HashSet::new();
    out.retain(|u| seen.insert(u.clone()));
    if out.is_empty() {
        return Err(AllUsersError::NoUsers);
    }
    Ok(out)
}

/// `doveadm user MASK`: one user name per line. A mask without wildcards names one user
/// (doveadm would print its userdb fields instead).
fn userdb_users(doveadm: &[OsString], mask: &str) -> Result<Vec<String>, AllUsersError> {
    if !mask.contains(['*', '?']) {
        return Ok(vec![mask.to_string()]);
    }
    let mut c = command(doveadm);
    c.args(["user", mask]).stdin(Stdio::null());
    let shown = format!("{} user {mask}", show(doveadm));
    let out = c.output().map_err(|source| AllUsersError::CannotRun { program: show(doveadm), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(AllUsersError::ListFailed { command: shown, status: out.status, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

fn read_user_file(path: &Path) -> Result<Vec<String>, AllUsersError> {
    let fail = |source| AllUsersError::UserFile { path: path.to_path_buf(), source };
    let mut text = String::new();
    std::fs::File::open(path).map_err(fail)?.take(USER_FILE_LIMIT).read_to_string(&mut text).map_err(fail)?;
    let mut users = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let user = line.trim();
        if user.is_empty() || user.starts_with('#') {
            continue;
        }
        if user.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(AllUsersError::BadUser { path: path.to_path_buf(), line: i + 1, why: "a user name has no spaces or control characters" });
        }
        users.push(user.to_string());
    }
    Ok(users)
}

/// Runs the command for each of `users`, `job.parallel` at a time; `done` gets each run as it
/// ends (in the order they end).
pub fn run(job: &AllUsers, users: &[String], mut done: impl FnMut(&UserRun)) -> Summary {
    let started = Instant::now();
    let queue = Mutex::new(users.iter().enumerate().collect::<VecDeque<_>>());
    let (tx, rx) = mpsc::channel();
    let mut first_failure: Option<(usize, i32)> = None;
    let mut summary = Summary { users: users.len(), ..Default::default() };
    std::thread::scope(|s| {
        for _ in 0..job.parallel.clamp(1, users.len().max(1)) {
            let (queue, tx) = (&queue, tx.clone());
            s.spawn(move || {
                loop {
                    // Its own statement: the queue's lock must not be held while the user runs.
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some((i, user)) = next else { return };
                    if tx.send((i, run_user(job, user))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for (i, r) in rx {
            match r.outcome {
                Outcome::Ok => summary.ok += 1,
                Outcome::Failed => summary.failed += 1,
                Outcome::TimedOut => summary.timed_out += 1,
            }
            if r.outcome != Outcome::Ok && first_failure.is_none_or(|(j, _)| i < j) {
                first_failure = Some((i, r.exit));
            }
            done(&r);
        }
    });
    summary.seconds = started.elapsed().as_secs_f64();
    summary.exit = first_failure.map_or(sysexits::EX_OK, |(_, code)| code);
    summary
}

fn command(doveadm: &[OsString]) -> Command {
    let mut c = Command::new(&doveadm[0]);
    c.args(&doveadm[1..]);
    c
}

fn show(words: &[OsString]) -> String {
    words.iter().map(|w| w.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// `doveadm [options] -f tab COMMAND -u USER ARGS…`, in a process group of its own (so its
/// whole tree can be stopped), stopped at the time limit.
fn run_user(job: &AllUsers, user: &str) -> UserRun {
    let started = Instant::now();
    let mut c = command(&job.doveadm);
    c.args(["-f", "tab"]).arg(&job.command[0]).args(["-u", user]).args(&job.command[1..]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut run = UserRun { user: user.to_string(), outcome: Outcome::Failed, exit: 0, seconds: 0.0, errors: Vec::new(), header: Vec::new(), rows: Vec::new() };
    let (status, stdout, stderr) = match c.spawn() {
        Ok(child) => wait_for(child, job.timeout),
        Err(e) => {
            run.exit = sysexits::EX_UNAVAILABLE;
            run.errors.push(format!("cannot run {}: {e}", show(&job.doveadm)));
            run.seconds = started.elapsed().as_secs_f64();
            return run;
        }
    };
    run.seconds = started.elapsed().as_secs_f64();
    run.errors = String::from_utf8_lossy(&stderr).lines().map(str::trim_end).filter(|l| !l.is_empty()).map(String::from).collect();
    let mut lines = std::str::from_utf8(&stdout).unwrap_or("").lines().filter(|l| !l.is_empty());
    run.header = lines.next().map(tab_cells).unwrap_or_default();
    run.rows = lines.map(tab_cells).collect();
    match status {
        Some(st) if st.success() => run.outcome = Outcome::Ok,
        Some(st) => run.exit = st.code().unwrap_or(sysexits::EX_SOFTWARE),
        None => {
            run.outcome = Outcome::TimedOut;
            run.exit = sysexits::EX_TEMPFAIL;
            run.errors.push(format!("stopped after {} s, its time limit", job.timeout.unwrap_or_default().as_secs_f64()));
        }
    }
    run
}

fn tab_cells(line: &str) -> Vec<String> {
    line.split('\t').map(String::from).collect()
}

/// Waits for `child` (None: stopped at `timeout`), reading its output meanwhile.
fn wait_for(mut child: Child, timeout: Option<Duration>) -> (Option<ExitStatus>, Vec<u8>, Vec<u8>) {
    let readers = [child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>), child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>)];
    let [out, err] = readers.map(|r| std::thread::spawn(move || r.map(read_bounded).unwrap_or_default()));
    // A thread waits, so a run that ends is seen at once; this one only watches the clock.
    let group = Pid::from_raw(child.id() as i32);
    let (ended, end) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().ok();
        let _ = ended.send(());
        status
    });
    let mut stopped = false;
    if let Some(limit) = timeout {
        if end.recv_timeout(limit).is_err() {
            // Its whole process group: SIGTERM, then after the grace SIGKILL.
            stopped = true;
            let _ = killpg(group, Signal::SIGTERM);
            let _ = end.recv_timeout(TERM_GRACE);
            // Whatever of the group is left holds our pipes open.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
    let status = waiter.join().ok().flatten().filter(|_| !stopped);
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

/// All of `r`, keeping the first `OUTPUT_LIMIT` bytes.
fn read_bounded(mut r: Box<dyn Read + Send>) -> Vec<u8> {
    let mut kept = Vec::new();
    let _ = (&mut r).take(OUTPUT_LIMIT).read_to_end(&mut kept);
    let _ = io::copy(&mut r, &mut io::sink());
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<OsString> {
        // A stand-in doveadm: `sh -c SCRIPT doveadm -f tab CMD -u USER …`, $5 is the user.
        vec!["sh".into(), "-c".into(), script.into(), "doveadm".into()]
    }

    #[test]
    fn every_user_runs_and_a_stuck_one_is_stopped_at_its_limit() {
        let script = r#"case "$5" in
            slow) sleep 30 ;;
            bad) echo "user	status"; echo "doveadm($5): Error: no such backend" >&2; exit 75 ;;
            *) printf 'user\tstatus\n%s\tok\n' "$5" ;;
        esac"#;
        let job = AllUsers { doveadm: sh(script), command: vec!["cmd".into()], parallel: 2, timeout: Some(Duration::from_millis(500)) };
        let users: Vec<String> = ["a", "slow", "bad", "b"].map(String::from).to_vec();
        let mut runs = Vec::new();
        let started = Instant::now();
        let summary = run(&job, &users, |r| runs.push(r.clone()));
        assert!(started.elapsed() < Duration::from_secs(20), "the stuck user was not stopped");
        runs.sort_by(|a, b| a.user.cmp(&b.user));
        let got: Vec<_> = runs.iter().map(|r| (r.user.as_str(), r.outcome, r.exit)).collect();
        assert_eq!(got, [("a", Outcome::Ok, 0), ("b", Outcome::Ok, 0), ("bad", Outcome::Failed, 75), ("slow", Outcome::TimedOut, 75)]);
        assert_eq!(runs[0].rows, [["a", "ok"]]);
        assert_eq!(runs[2].errors, ["doveadm(bad): Error: no such backend"]);
        assert_eq!((summary.users, summary.ok, summary.failed, summary.timed_out, summary.exit), (4, 2, 1, 1, 75));
    }

    #[test]
    fn users_run_side_by_side() {
        // Each stand-in waits (up to 20 s) until all of them have started: only runs that are
        // under way at the same time can all succeed.
        let t = tempfile::tempdir().unwrap();
        let script = format!(r#"touch {0}/"$5"; for i in $(seq 200); do [ $(ls {0} | wc -l) -ge 3 ] && exit 0; sleep 0.1; done; exit 1"#, t.path().display());
        let job = AllUsers { doveadm: sh(&script), command: vec!["cmd".into()], parallel: 3, timeout: None };
        let users: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let summary = run(&job, &users, |_| {});
        assert_eq!((summary.ok, summary.exit), (3, 0), "{summary:?}");
    }

    #[test]
    fn a_user_file_is_read_line_by_line() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("users");
        std::fs::write(&f, "alice\n\n# a comment\n bob \nalice\n").unwrap();
        assert_eq!(list_users(&sh("exit 1"), &Users::File(f.clone())).unwrap(), ["alice", "bob"]);
        std::fs::write(&f, "alice\nbob carol\n").unwrap();
        let e = list_users(&sh("exit 1"), &Users::File(f)).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
