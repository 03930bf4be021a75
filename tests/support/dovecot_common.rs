//! Pieces shared by the two private-Dovecot harnesses ([`super::dovecot`] for 2.3 on the host and
//! [`super::dovecot24`] for 2.4 in a chroot): process helpers, stopping a master, log tails, command-failure
//! panics, instance-directory setup, `doveadm fetch` parsing and config fragments.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use super::dovecot::PASSWORD;

pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// `prog args...` as a shell command line, quoting args with characters outside the plain set
/// (`-_./=:,@%+` plus `extra_plain`).
pub(super) fn shell_line(prog: &str, args: &[&str], extra_plain: &str) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        if !a.is_empty()
            && a.chars().all(|c| {
                c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c) || extra_plain.contains(c)
            })
        {
            s.push_str(a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        }
    }
    s
}

pub(super) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// pid → ppid for every process (from /proc).
fn process_parents() -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) S ppid ..." — comm may contain spaces/parens; parse after the last ')'.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let Some(ppid) = f.get(1).and_then(|p| p.parse().ok()) {
                m.insert(pid, ppid);
            }
        }
    }
    m
}

/// All descendants of `pid` (children, grandchildren, ...).
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents = process_parents();
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for (&c, &pp) in &parents {
            if pp == p && !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Alive = exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
            state.as_deref() != Some("Z")
        }
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a single, specific pid (never 0 or negative).
    if pid > 1 {
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// Stop a master: SIGTERM to `pid` only (SIGKILL after [`STOP_TIMEOUT`]), wait for it to exit and for
/// `kids` (its former children) to disappear (SIGKILL to those left after 10 s). `what` names the server in
/// messages ("dovecot", "dovecot 2.4"). Never panics.
pub(super) fn stop_master(mut child: Child, pid: u32, kids: &[u32], what: &str, dir: &Path) {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                eprintln!(
                    "{what} master {pid} ({}) ignored SIGTERM; killing",
                    dir.display()
                );
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    // The master signals its children on shutdown; wait until they are gone too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = kids.iter().copied().filter(|&k| pid_alive(k)).collect();
        if alive.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("{what} children {alive:?} of {pid} still alive; SIGKILL");
            for k in alive {
                signal(k, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the master process `child` is still running.
pub(super) fn child_running(child: Option<&mut Child>) -> bool {
    match child {
        Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
        None => false,
    }
}

/// Last 80 lines of DIR/dovecot.log (plus DIR/dovecot.stderr if not empty), with a heading naming `what`.
pub(super) fn log_tail(dir: &Path, what: &str) -> String {
    let log = fs::read_to_string(dir.join("dovecot.log")).unwrap_or_default();
    let err = fs::read_to_string(dir.join("dovecot.stderr")).unwrap_or_default();
    let mut s = format!(
        "--- {what} log tail ({}) ---\n{}",
        dir.join("dovecot.log").display(),
        tail_lines(&log, 80)
    );
    if !err.trim().is_empty() {
        s.push_str(&format!(
            "\n--- dovecot stderr ---\n{}",
            tail_lines(&err, 20)
        ));
    }
    s
}

/// Panic with everything useful about a failed command.
pub(super) fn command_failed(cmdline: &str, out: &Output, log_tail: &str) -> ! {
    panic!(
        "command failed: {cmdline}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log_tail
    )
}

/// Create the vmail-owned mail (and, with `control`, control and index) dirs of an instance in `dir`.
pub(super) fn create_mail_dirs(dir: &Path, control: bool, vuid: u32, vgid: u32) {
    let mut owned = vec![dir.join("mail")];
    if control {
        owned.push(dir.join("control"));
        owned.push(dir.join("index"));
    }
    for p in &owned {
        fs::create_dir(p).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(p, Some(vuid), Some(vgid)).unwrap();
    }
}

/// Write the passwd-file at `path` with `users` (password [`PASSWORD`]), mode 0644.
pub(super) fn write_passwd(path: &Path, users: &[String]) {
    let passwd: String = users
        .iter()
        .map(|u| format!("{u}:{{PLAIN}}{PASSWORD}:::::\n"))
        .collect();
    fs::write(path, passwd).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// Append `user` to the passwd-file at `path`.
pub(super) fn append_passwd(path: &Path, user: &str) {
    let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
    writeln!(f, "{user}:{{PLAIN}}{PASSWORD}:::::").unwrap();
}

/// Poll `doveadm user USER` (via `doveadm`) until it succeeds; after 10 s hand the last output to `failed`.
pub(super) fn wait_for_user(
    user: &str,
    doveadm: impl Fn(&[&str]) -> Output,
    failed: impl Fn(&Output),
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = doveadm(&["user", user]);
        if out.status.success() {
            return;
        }
        if Instant::now() > deadline {
            failed(&out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `doveadm [-o OVERRIDE]... -f tab fetch -u user 'uid flags' mailbox MAILBOX` via `doveadm_ok`, parsed into
/// `(uid, flags)` rows sorted by uid, flags normalized ([`normalize_flags`]).
pub(super) fn fetch_uid_flags(
    doveadm_ok: impl Fn(&[&str]) -> String,
    user: &str,
    mailbox: &str,
    overrides: &[String],
) -> Vec<(u32, String)> {
    let mut args: Vec<&str> = Vec::new();
    for o in overrides {
        args.extend_from_slice(&["-o", o]);
    }
    args.extend_from_slice(&[
        "-f",
        "tab",
        "fetch",
        "-u",
        user,
        "uid flags",
        "mailbox",
        mailbox,
    ]);
    let out = doveadm_ok(&args);
    let mut rows = Vec::new();
    for (n, line) in out.lines().enumerate() {
        if n == 0 && line.starts_with("uid") {
            continue; // header
        }
        if line.is_empty() {
            continue;
        }
        let (uid, flags) = line.split_once('\t').unwrap_or((line, ""));
        let uid: u32 = uid
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad doveadm fetch line {line:?} in:\n{out}"));
        rows.push((uid, normalize_flags(flags)));
    }
    rows.sort();
    rows
}

/// Sort flags, drop `\Recent`, join with single spaces.
pub fn normalize_flags(flags: &str) -> String {
    let mut f: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
        .collect();
    f.sort_unstable();
    f.join(" ")
}

/// Keep (and print) the instance dir when `MB_KEEP_TEST_DIRS` is set; otherwise dropping `tmp` removes it.
pub(super) fn keep_or_remove(tmp: Option<tempfile::TempDir>, what: &str) {
    if let Some(tmp) = tmp {
        if std::env::var_os("MB_KEEP_TEST_DIRS").is_some() {
            #[allow(deprecated)]
            let p = tmp.into_path();
            eprintln!("MB_KEEP_TEST_DIRS: keeping {what} test dir {}", p.display());
        }
    }
}

/// The `service stats` block of both versions' configs.
pub(super) const STATS_SERVICE: &str = r#"# mail processes run as vmail and report to stats; avoid "Permission denied" noise in the log.
service stats {
  unix_listener stats-writer {
    mode = 0666
  }
}
"#;

/// The tail of both versions' configs: from `mail_fsync` to the end (namespace, lda, `extra`).
pub(super) fn conf_tail(nfs: bool, excl: bool, sep: char, extra: &str) -> String {
    format!(
        r#"mail_fsync = never
mail_nfs_storage = {nfs}
dotlock_use_excl = {excl}

namespace inbox {{
  inbox = yes
  separator = {sep}
}}

lda_mailbox_autocreate = yes
protocol lda {{
  postmaster_address = postmaster@example.com
}}

{extra}
"#,
        nfs = if nfs { "yes" } else { "no" },
        excl = if excl { "yes" } else { "no" },
    )
}
