//! Users per second over many small users, the shape of a provider's backend: `doveadm -A
//! maildir-backup` on the backend one user at a time and with `doveadm_worker_count` doveadm-server
//! workers (Dovecot's own parallelism), `maildir-backup all-users` on the backend and through the
//! proxy, and doveadm's own `-A` through the proxy, all in one run on the same users. Each writes a
//! first snapshot of every user into a repository of its own. Reported: wall time, users/s (and as
//! a ratio to `doveadm -A` one user at a time), peak RSS of the client side (GNU time: the doveadm
//! client, or all-users and its doveadm children) and of the biggest doveadm-server process (sampled).
//!
//! `cargo bench --bench cluster` (as root; Dovecot 2.3 on loopback, or with `-- --dovecot 2.4` 2.4 in
//! the Debian 13 root, with the tests' cluster harness and the plugin built for release). Options: `-- --users 2000 --messages 50 --workers 4 --limit 600` (seconds a run may take: doveadm's
//! client can hang, and is then stopped and reported).

#[allow(dead_code, unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::cluster::{Cluster, ClusterRelease};
use support::dovecot_common::descendants;
use support::plugin::{build, Profile};
use support::{Instance, V23, V24};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::args().skip_while(|a| a != name).nth(1).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `messages` small messages in each user's INBOX (files written directly, as Dovecot names them).
fn make_mail<R: ClusterRelease>(d: &Instance<R>, users: &[String], messages: usize) {
    let body = "x".repeat(2000);
    for (u, user) in users.iter().enumerate() {
        let root = d.maildir(user);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        for i in 0..messages {
            let name = format!("{}.M{i}P{u}.bench,S={}:2,S", 1_700_000_000 + i, body.len() + 60);
            fs::write(root.join("cur").join(name), format!("Message-ID: <{i}.{user}@bench>\r\nSubject: {i}\r\n\r\n{body}")).unwrap();
        }
    }
    R::chown_vmail(&d.dir().join("mail"));
}

/// The biggest peak RSS (VmHWM, KiB) of the doveadm-server processes under `master`, sampled until
/// `stop`; and how many there were.
fn watch_servers(master: u32, stop: &AtomicBool) -> (u64, usize) {
    let (mut peak, mut seen) = (0, std::collections::HashSet::new());
    while !stop.load(Ordering::Relaxed) {
        for pid in descendants(master) {
            let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
            if !status.lines().next().is_some_and(|l| l.contains("doveadm-server") || l.ends_with("doveadm")) {
                continue;
            }
            seen.insert(pid);
            let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap_or(0);
            peak = peak.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (peak, seen.len())
}

struct Measured {
    seconds: f64,
    client_kib: u64,
    server_kib: u64,
    servers: usize,
    /// Killed at the time limit (doveadm's client can hang for ever).
    hung: bool,
}

/// Runs `cmd` under GNU time while watching `master`'s doveadm servers; stops it at `limit`.
fn measure(cmd: &[String], master: u32, limit: Duration) -> Measured {
    use std::os::unix::process::CommandExt;
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_servers(master, &stop));
        let started = Instant::now();
        let mut child = Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(rss_file.path())
            .args(cmd)
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("run under /usr/bin/time");
        let mut hung = false;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if started.elapsed() > limit {
                hung = true;
                // SAFETY: signals our own child's process group.
                unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (server_kib, servers) = watcher.join().unwrap();
        assert!(hung || status.success(), "{cmd:?} failed: {status}");
        let client_kib = fs::read_to_string(rss_file.path()).unwrap_or_default().trim().parse().unwrap_or(0);
        Measured { seconds, client_kib, server_kib, servers, hung }
    })
}

/// Users with a snapshot in `repo` (the series in it).
fn users_done(repo: &Path) -> usize {
    fs::read_dir(repo).map(|rd| rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).count()).unwrap_or(0)
}

fn words(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn main() {
    // The cluster harness loads the plugins named here (set before any thread starts).
    if arg("--dovecot", "2.3".to_string()) == "2.4" {
        let root = support::trixie::root();
        let dir = build("plugin24-bench", Some(&root.join("usr/lib/dovecot/dovecot-config")), Profile::Release);
        std::env::set_var("MB_PLUGIN24_SO", dir.join("libmaildir_backup.so"));
        std::env::set_var("MB_SETTINGS24_SO", dir.join("libmaildir_backup_settings.so"));
        bench::<V24>("2.4");
    } else {
        std::env::set_var("MB_PLUGIN_SO", build("plugin-bench", None, Profile::Release).join("libmaildir_backup.so"));
        bench::<V23>("2.3");
    }
}

fn bench<R: ClusterRelease>(release: &str) {
    let n: usize = arg("--users", 2000);
    let messages: usize = arg("--messages", 50);
    let workers: usize = arg("--workers", 4);
    let users: Vec<String> = (0..n).map(|i| format!("u{i:05}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let c = Cluster::<R>::start(&[&names], None);
    let b = &c.backends[0];
    make_mail(&b.dovecot, &users, messages);
    let out = R::tempdir();
    R::chown_vmail(out.path());
    let master = b.dovecot.master_pid().expect("the backend runs");
    let doveadm = c.doveadm.display().to_string();
    let cli = env!("CARGO_BIN_EXE_maildir-backup").to_string();
    let (bconf, pconf) = (b.dovecot.conf_in_root().display().to_string(), c.proxy.conf_in_root().display().to_string());
    let repo_dir = |name: &str| out.path().join(name);
    let repo = |name: &str| format!("repo:{}", R::inside(&repo_dir(name)).display());
    let workers_opt = format!("doveadm_worker_count={workers}");
    let j = workers.to_string();
    let limit = Duration::from_secs(arg("--limit", 600));
    let runs: Vec<(&str, String, Vec<String>)> = vec![
        ("a", "doveadm -A on the backend, one user at a time".into(), words(&[&doveadm, "-c", &bconf, "maildir-backup", "-A", &repo("a")])),
        ("b", format!("doveadm -A on the backend, doveadm_worker_count={workers}"), words(&[&doveadm, "-c", &bconf, "-o", &workers_opt, "maildir-backup", "-A", &repo("b")])),
        ("c", format!("all-users -j {j} on the backend"), words(&[&cli, "all-users", "--doveadm", &doveadm, "-c", &bconf, "-j", &j, "--", "maildir-backup", &repo("c")])),
        ("d", "all-users -j 1 through the proxy".into(), words(&[&cli, "all-users", "--doveadm", &doveadm, "-c", &pconf, "-j", "1", "--", "maildir-backup", &repo("d")])),
        ("e", format!("all-users -j {j} through the proxy"), words(&[&cli, "all-users", "--doveadm", &doveadm, "-c", &pconf, "-j", &j, "--", "maildir-backup", &repo("e")])),
        ("f", "doveadm -A through the proxy (one backend)".into(), words(&[&doveadm, "-c", &pconf, "maildir-backup", "-A", &repo("f")])),
    ];
    println!("{n} users of {messages} messages on one backend (Dovecot {release}, plugin built for release); first snapshot of every user per run\n");
    println!("{:<52} {:>8} {:>9} {:>7} {:>11} {:>11} {:>8}", "run", "seconds", "users/s", "ratio", "client RSS", "server RSS", "servers");
    let mut base = None;
    for (name, what, cmd) in runs {
        let m = measure(&cmd, master, limit);
        let done = users_done(&repo_dir(name));
        if m.hung {
            println!("{what:<52} did not finish: stopped after {:.0} s with {done} of {n} users backed up", m.seconds);
            continue;
        }
        assert_eq!(done, n, "{what}: not every user was backed up");
        let rate = n as f64 / m.seconds;
        let base_rate = *base.get_or_insert(rate);
        println!(
            "{what:<52} {:>8.1} {rate:>9.1} {:>7.2} {:>7.1} MiB {:>7.1} MiB {:>8}",
            m.seconds,
            rate / base_rate,
            m.client_kib as f64 / 1024.0,
            m.server_kib as f64 / 1024.0,
            m.servers
        );
    }
    println!("\nratio: users/s against the first run. server RSS: the biggest doveadm-server process; servers: how many ran.");
}
