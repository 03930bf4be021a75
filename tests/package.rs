//! The Debian packages as an admin meets them: each package (`make deb`, one per Dovecot release) is
//! installed with `apt-get install ./maildir-backup_*.deb` into a fresh copy of a pristine debootstrap root
//! of its release (Debian 12: Dovecot 2.3, Debian 13: Dovecot 2.4), where apt resolves its dependencies from
//! the Debian mirror, then used there as root would on a mail server:
//!
//! - the files are where Debian keeps them, the config example and the environment file are conffiles, and
//!   `Depends:` names the `dovecot-abi-*` that the release's own headers declare;
//! - the installed `doveadm maildir-backup -A` snapshots two users of a Dovecot running in the root (its
//!   own dovecot.conf with a passwd-file userdb, including the installed config example, in which the
//!   metrics file is switched on as an admin would), and the installed CLI verifies and checks them;
//! - the service's `ExecStart=` lines, read from the installed unit with its `Environment=` defaults and
//!   the environment file, run by hand twice: a snapshot per user per run, pruned to the configured one;
//! - `systemd-analyze verify` accepts the units (inside the root, where their programs are), `man -l`
//!   renders every page, bash loads the completion, and lintian reports no error;
//! - `dpkg --purge` removes every file the package installed (conffiles too) and doveadm still works;
//! - on Debian 13 the Debian 12 package is refused: apt will not install it and `dpkg -i` leaves it
//!   unconfigured, for want of `dovecot-abi-2.3.abiv19`.
//!
//! Environment: `MB_DEB12` / `MB_DEB13` name the packages and `MB_BOOKWORM_BASE` / `MB_TRIXIE_BASE` the
//! pristine roots (scripts/test.sh prepares all four); without them the test builds what it lacks
//! (`make deb`, `scripts/debian-root.sh`). Needs root, network access to a Debian mirror and lintian.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use support::dovecot_common::{processes_with_root, signal, tempdir_in};
use support::promtext;
use support::*;

/// One Debian release and its package.
struct Suite {
    codename: &'static str,
    /// `~deb12` in the package version.
    version_suffix: &'static str,
    deb_env: &'static str,
    base_env: &'static str,
    /// The header the release's Dovecot ABI is read from (host path).
    config_h: fn() -> PathBuf,
    /// `make deb` arguments that build this release's package.
    make_args: fn() -> Vec<String>,
    dovecot_conf: &'static str,
    /// The metrics key's line in the installed config example, commented out.
    metrics_line: &'static str,
    /// Where the package puts the systemd units.
    unit_dir: &'static str,
}

const BOOKWORM: Suite = Suite {
    codename: "bookworm",
    version_suffix: "~deb12",
    deb_env: "MB_DEB12",
    base_env: "MB_BOOKWORM_BASE",
    config_h: || PathBuf::from("/usr/include/dovecot/config.h"),
    make_args: Vec::new,
    dovecot_conf: "protocols =
mail_location = maildir:/srv/mail/%u/Maildir
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 1
ssl = no
log_path = /var/log/dovecot.log
passdb {
  driver = passwd-file
  args = /etc/dovecot/users
}
userdb {
  driver = passwd-file
  args = /etc/dovecot/users
}
!include_try conf.d/95-maildir-backup.conf
",
    metrics_line: "  #maildir_backup_metrics = ",
    unit_dir: "/lib/systemd/system",
};

const TRIXIE: Suite = Suite {
    codename: "trixie",
    version_suffix: "~deb13",
    deb_env: "MB_DEB13",
    base_env: "MB_TRIXIE_BASE",
    config_h: || support::trixie::root().join("usr/include/dovecot/config.h"),
    make_args: || vec![format!("DOVECOT_CONFIG={}", support::trixie::root().join("usr/lib/dovecot/dovecot-config").display())],
    dovecot_conf: "dovecot_config_version = 2.4.1
dovecot_storage_version = 2.4.1
protocols =
mail_driver = maildir
mail_path = /srv/mail/%{user}/Maildir
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 1
ssl = no
log_path = /var/log/dovecot.log
passdb passwd-file {
  passwd_file_path = /etc/dovecot/users
}
userdb passwd-file {
  passwd_file_path = /etc/dovecot/users
}
!include_try conf.d/95-maildir-backup.conf
",
    metrics_line: "#maildir_backup_metrics = ",
    unit_dir: "/usr/lib/systemd/system",
};

const REPO: &str = "/var/backups/maildir-backup";
const METRICS_DIR: &str = "/var/lib/prometheus/node-exporter";
const USERS: [&str; 2] = ["alice", "bob"];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------------------
// The packages and the pristine roots

/// The last line a successful `cmd` printed.
fn last_line(cmd: Command) -> String {
    let r = Run::of(cmd);
    r.expect_ok();
    r.stdout.lines().last().unwrap_or_default().trim().to_string()
}

/// The suite's package: `$MB_DEB12`/`$MB_DEB13`, else built here (one `make deb` at a time: both share
/// debian/).
fn deb(suite: &Suite) -> PathBuf {
    if let Some(p) = std::env::var_os(suite.deb_env) {
        return PathBuf::from(p);
    }
    static MAKE: Mutex<()> = Mutex::new(());
    let _one = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let mut make = Command::new("flock");
    make.arg(manifest_dir().join("target/deb.lock")).args(["make", "deb"]).args((suite.make_args)()).current_dir(manifest_dir());
    Run::of(make).expect_ok();
    let dir = manifest_dir().join("target/deb");
    let mut debs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(&format!("{}_", suite.version_suffix)))
        .collect();
    debs.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop().unwrap_or_else(|| panic!("make deb left no *{}_*.deb in {}", suite.version_suffix, dir.display()))
}

/// The suite's pristine debootstrap root: `$MB_BOOKWORM_BASE`/`$MB_TRIXIE_BASE`, else built (once) here.
fn base_root(suite: &Suite) -> PathBuf {
    if let Some(p) = std::env::var_os(suite.base_env) {
        return PathBuf::from(p);
    }
    let mut c = Command::new("bash");
    c.arg(manifest_dir().join("scripts/debian-root.sh"))
        .arg(suite.codename)
        .arg(format!("/var/cache/maildir-backup/{}-base", suite.codename))
        .stderr(Stdio::inherit());
    PathBuf::from(last_line(c))
}

/// `dovecot-abi-2.3.abiv19` from `#define DOVECOT_ABI_VERSION "2.3.ABIv19(2.3.19.1)"`.
fn abi_package(config_h: &Path) -> String {
    let text = fs::read_to_string(config_h).unwrap_or_else(|e| panic!("{}: {e}", config_h.display()));
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("#define DOVECOT_ABI_VERSION \""))
        .and_then(|v| v.split(['(', '"']).next())
        .unwrap_or_else(|| panic!("no DOVECOT_ABI_VERSION in {}", config_h.display()));
    format!("dovecot-abi-{}", version.to_lowercase())
}

// ---------------------------------------------------------------------------------------------------------
// A throwaway copy of a root

/// A copy of a pristine root with proc mounted; on drop every process in it is killed, proc unmounted and
/// the copy removed.
struct Root {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Root {
    fn copy_of(base: &Path) -> Root {
        let dir = tempdir_in(Path::new("/var/tmp"), "mbt-pkg-");
        let path = dir.path().join("root");
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(base).arg(&path);
        Run::of(cp).expect_ok();
        let root = Root { _dir: dir, path };
        let mut mount = Command::new("mount");
        mount.args(["-t", "proc", "proc"]).arg(root.path.join("proc"));
        Run::of(mount).expect_ok();
        // apt in the root resolves the mirror's name as the host does.
        fs::copy("/etc/resolv.conf", root.path.join("etc/resolv.conf")).expect("copy /etc/resolv.conf into the root");
        root
    }

    fn host(&self, inside: &str) -> PathBuf {
        self.path.join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT ARGS...`, killed after ten minutes (apt waits on the network).
    fn run(&self, args: &[&str]) -> Run {
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", "600", "chroot"]).arg(&self.path).args(args).env("DEBIAN_FRONTEND", "noninteractive").env("LC_ALL", "C");
        Run::of(c)
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.status.success(), "{}\n--- dovecot log ---\n{}", r.show(), self.dovecot_log());
        r.stdout
    }

    fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-ec", script])
    }

    fn write(&self, inside: &str, text: &str) {
        let p = self.host(inside);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    fn dovecot_log(&self) -> String {
        fs::read_to_string(self.host("/var/log/dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = processes_with_root(&self.path);
            if pids.is_empty() {
                break;
            }
            pids.into_iter().for_each(|p| signal(p, libc::SIGKILL));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg(self.path.join("proc")).status();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Steps

/// `apt-get install ./DEB` in the root; the package's files and control fields are Debian's.
fn install(root: &Root, suite: &Suite, deb: &Path) {
    let name = deb.file_name().unwrap().to_str().unwrap();
    fs::copy(deb, root.host(&format!("/tmp/{name}"))).unwrap();
    root.ok(&["apt-get", "update", "-q"]);
    root.ok(&["apt-get", "install", "-y", "-q", "--no-install-recommends", &format!("/tmp/{name}")]);

    let depends = root.ok(&["dpkg-query", "-W", "-f", "${Depends}", "maildir-backup"]);
    let abi = abi_package(&(suite.config_h)());
    assert!(depends.split(", ").any(|d| d == abi), "Depends: {depends} lacks {abi}");
    let version = root.ok(&["dpkg-query", "-W", "-f", "${Version}", "maildir-backup"]);
    assert!(version.ends_with(suite.version_suffix), "version {version}");
    let conffiles = root.ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "maildir-backup"]);
    for c in ["/etc/dovecot/conf.d/95-maildir-backup.conf", "/etc/default/maildir-backup"] {
        assert!(conffiles.contains(c), "{c} is not a conffile: {conffiles}");
    }
    let mut expected = vec![
        "/usr/bin/maildir-backup",
        "/usr/lib/dovecot/modules/doveadm/lib20_doveadm_maildir_backup_plugin.so",
        "/usr/share/man/man1/maildir-backup.1.gz",
        "/usr/share/man/man1/maildir-backup-check.1.gz",
        "/usr/share/man/man1/doveadm-maildir-backup.1.gz",
        "/usr/share/bash-completion/completions/maildir-backup",
        "/usr/share/zsh/vendor-completions/_maildir-backup",
        "/usr/share/fish/vendor_completions.d/maildir-backup.fish",
    ];
    let listed = root.ok(&["dpkg", "-L", "maildir-backup"]);
    for unit in ["maildir-backup.service", "maildir-backup.timer"] {
        assert!(listed.lines().any(|l| l == format!("{}/{unit}", suite.unit_dir)), "{unit} not in {}:\n{listed}", suite.unit_dir);
    }
    if suite.codename == "trixie" {
        expected.push("/usr/lib/dovecot/modules/settings/libmaildir_backup_settings.so");
    }
    for f in expected {
        assert!(root.host(f).is_file(), "{f} not installed");
    }
}

/// Dovecot with `alice` and `bob` (three messages each in INBOX and Sent), the installed config example
/// with its metrics line switched on, and the repository the unit expects.
fn configure_and_start(root: &Root, suite: &Suite) {
    root.write("/etc/dovecot/dovecot.conf", suite.dovecot_conf);
    root.write("/etc/dovecot/users", "alice:{PLAIN}secret::::::\nbob:{PLAIN}secret::::::\n");
    let example = root.host("/etc/dovecot/conf.d/95-maildir-backup.conf");
    let text = fs::read_to_string(&example).unwrap();
    assert!(text.contains(suite.metrics_line), "{}: no {:?}", example.display(), suite.metrics_line);
    let on = suite.metrics_line.replacen('#', "", 1);
    fs::write(&example, text.replacen(suite.metrics_line, &on, 1)).unwrap();
    root.sh(&format!("install -d -o vmail -g vmail /srv/mail {METRICS_DIR}; install -d -o vmail -g vmail -m 0700 {REPO}"));
    // Not through pipes: the daemon would hold them open, and the wait for their end would never end.
    root.sh("exec /usr/sbin/dovecot >/var/log/dovecot.start 2>&1");
    for user in USERS {
        root.ok(&["doveadm", "mailbox", "create", "-u", user, "Sent"]);
        for (i, mailbox) in ["INBOX", "INBOX", "INBOX", "Sent", "Sent", "Sent"].iter().enumerate() {
            root.write("/tmp/msg", &String::from_utf8(message(i, 2000)).unwrap());
            root.sh(&format!("doveadm save -u {user} -m {mailbox} < /tmp/msg"));
        }
    }
}

/// The series' snapshot names, oldest first.
fn snapshots(root: &Root, user: &str) -> Vec<String> {
    let series = root.host(&format!("{REPO}/{user}"));
    let mut names: Vec<String> = fs::read_dir(&series)
        .unwrap_or_else(|e| panic!("{}: {e}", series.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// The installed plugin snapshots both users; the installed CLI verifies and checks the repository;
/// the metrics file (switched on in the config example) holds both users.
fn backup_all_users(root: &Root) {
    root.ok(&["doveadm", "maildir-backup", "-A", &format!("repo:{REPO}")]);
    for user in USERS {
        let snaps = snapshots(root, user);
        assert_eq!(snaps.len(), 1, "{user}");
        root.ok(&["maildir-backup", "verify", &format!("{REPO}/{user}/{}", snaps[0])]);
    }
    let check = root.ok(&["maildir-backup", "check", REPO, "--name", "alice", "--name", "bob"]);
    assert!(check.starts_with("MAILDIR-BACKUP OK: 2 users"), "{check}");
    let prom = root.host(&format!("{METRICS_DIR}/maildir-backup.prom"));
    let samples = promtext::read(&prom);
    for user in USERS {
        assert_eq!(promtext::user_value(&samples, "maildir_backup_messages", user), 6.0, "{user}");
    }
}

/// `KEY=value` or `KEY="value"`, as systemd reads Environment= and environment files.
fn assignment(line: &str) -> Option<(String, String)> {
    let (k, v) = line.trim().split_once('=')?;
    Some((k.to_string(), v.trim_matches('"').to_string()))
}

/// The unit's `ExecStart=` lines as argument vectors: `$VAR` expanded from `Environment=` and the
/// `EnvironmentFile=`, split into words as systemd does for an unbraced variable.
fn exec_starts(root: &Root, suite: &Suite) -> Vec<Vec<String>> {
    let unit = fs::read_to_string(root.host(&format!("{}/maildir-backup.service", suite.unit_dir))).unwrap();
    let mut env: Vec<(String, String)> = unit.lines().filter_map(|l| l.strip_prefix("Environment=")).filter_map(assignment).collect();
    let file = unit.lines().find_map(|l| l.strip_prefix("EnvironmentFile=")).expect("no EnvironmentFile=");
    let text = fs::read_to_string(root.host(file.trim_start_matches('-'))).unwrap_or_default();
    env.extend(text.lines().filter(|l| !l.trim_start().starts_with('#')).filter_map(assignment));
    let lookup = |name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    unit.lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .map(|cmd| {
            cmd.split_whitespace()
                .flat_map(|w| match w.strip_prefix('$') {
                    Some(var) => lookup(var).split_whitespace().map(String::from).collect(),
                    None => vec![w.to_string()],
                })
                .collect()
        })
        .collect()
}

/// The service's work, by hand, twice, with `--keep-last 1` in the environment file: each run adds a
/// snapshot per user and the prune leaves only the newest.
fn run_the_service_by_hand(root: &Root, suite: &Suite) {
    let defaults = root.host("/etc/default/maildir-backup");
    let text = fs::read_to_string(&defaults).unwrap();
    fs::write(&defaults, format!("{text}MAILDIR_BACKUP_KEEP=\"--keep-last 1\"\n")).unwrap();
    let commands = exec_starts(root, suite);
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(commands[1][commands[1].len() - 2..], ["--keep-last", "1"], "{commands:?}");
    for _ in 0..2 {
        let before: Vec<Vec<String>> = USERS.iter().map(|u| snapshots(root, u)).collect();
        for argv in &commands {
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            root.ok(&args);
        }
        for (user, before) in USERS.iter().zip(before) {
            let after = snapshots(root, user);
            assert_eq!(after.len(), 1, "{user}: {after:?}");
            assert!(after[0] > before[before.len() - 1], "{user}: {before:?} -> {after:?}");
        }
    }
}

/// `systemd-analyze verify` (inside the root, with systemd and man-db installed there), man pages,
/// completion and lintian.
fn check_units_docs_and_lint(root: &Root, suite: &Suite, deb: &Path) {
    // man-db: verify looks up each Documentation=man:… page, i.e. ours.
    root.ok(&["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd", "man-db"]);
    let unit = |name: &str| format!("{}/{name}", suite.unit_dir);
    let verify = root.run(&["systemd-analyze", "verify", &unit("maildir-backup.service"), &unit("maildir-backup.timer")]);
    assert!(verify.status.success() && !verify.stderr.contains("maildir-backup"), "{}", verify.show());

    let man1 = root.host("/usr/share/man/man1");
    let pages: Vec<PathBuf> = fs::read_dir(&man1).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().contains("maildir-backup")).collect();
    assert!(pages.len() >= 10, "{pages:?}");
    for page in pages {
        let mut man = Command::new("man");
        man.arg("-l").arg(&page).env("MANWIDTH", "80").env("MANPAGER", "cat").env("LC_ALL", "C.UTF-8");
        let r = Run::of(man);
        r.expect_ok();
        assert!(r.stdout.contains("NAME") && r.stdout.contains("SYNOPSIS") && r.stderr.is_empty(), "{}", r.show());
    }
    let completion = root.host("/usr/share/bash-completion/completions/maildir-backup");
    let mut bash = Command::new("bash");
    bash.arg("-c").arg(r#"source "$1" && complete -p maildir-backup"#).arg("bash").arg(&completion);
    let r = Run::of(bash);
    r.expect_ok();
    assert!(r.stdout.contains("maildir-backup"), "{}", r.show());

    let mut lintian = Command::new("lintian");
    lintian.args(["--fail-on", "error"]).arg(deb);
    let r = Run::of(lintian);
    assert!(r.status.success() && !r.stdout.lines().any(|l| l.starts_with("E:")), "{}", r.show());
}

/// `dpkg --purge` removes every file the package listed (its conffiles too); doveadm still works.
fn purge(root: &Root) {
    let listed = root.ok(&["dpkg", "-L", "maildir-backup"]);
    // Directories (and /lib, a link to one on a merged-/usr system) may be shared with other packages.
    let files: Vec<&str> = listed.lines().filter(|f| fs::metadata(root.host(f)).is_ok_and(|m| !m.is_dir())).collect();
    assert!(files.len() >= 15, "{files:?}");
    root.ok(&["dpkg", "--purge", "maildir-backup"]);
    for f in files.iter().chain(&["/etc/dovecot/conf.d/95-maildir-backup.conf", "/etc/default/maildir-backup"]) {
        assert!(root.host(f).symlink_metadata().is_err(), "{f} left after the purge");
    }
    root.ok(&["doveadm", "mailbox", "list", "-u", "alice"]);
    let r = root.run(&["doveadm", "maildir-backup", "-u", "alice", "/tmp/gone"]);
    assert!(!r.status.success(), "{}", r.show());
}

/// dpkg's two-letter state of the package ("ii" installed, "iU" unpacked), "" when dpkg does not know it.
fn dpkg_status(root: &Root) -> String {
    let r = root.run(&["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "maildir-backup"]);
    let state = r.stdout.trim();
    if r.status.success() && !state.starts_with('u') && !state.starts_with('p') { state.chars().take(2).collect() } else { String::new() }
}

fn package_lifecycle(suite: &Suite) -> Root {
    let deb = deb(suite);
    let root = Root::copy_of(&base_root(suite));
    install(&root, suite, &deb);
    configure_and_start(&root, suite);
    backup_all_users(&root);
    run_the_service_by_hand(&root, suite);
    check_units_docs_and_lint(&root, suite, &deb);
    purge(&root);
    root
}

#[test]
fn debian12_package_installs_backs_up_and_purges() {
    package_lifecycle(&BOOKWORM);
}

/// Also: the Debian 12 package on Debian 13, which has no `dovecot-abi-2.3.abiv19`.
#[test]
fn debian13_package_installs_backs_up_and_purges_and_refuses_the_debian12_one() {
    let root = package_lifecycle(&TRIXIE);
    let deb12 = deb(&BOOKWORM);
    let name = deb12.file_name().unwrap().to_str().unwrap();
    fs::copy(&deb12, root.host(&format!("/tmp/{name}"))).unwrap();
    let abi = abi_package(&(BOOKWORM.config_h)());

    let apt = root.run(&["apt-get", "install", "-y", "-q", &format!("/tmp/{name}")]);
    assert!(!apt.status.success() && apt.show().contains(&abi), "apt installed the 2.3 package on 2.4:\n{}", apt.show());
    assert_eq!(dpkg_status(&root), "", "apt left the 2.3 package behind");

    let dpkg = root.run(&["dpkg", "-i", &format!("/tmp/{name}")]);
    assert!(!dpkg.status.success() && dpkg.stderr.contains(&abi), "{}", dpkg.show());
    assert_eq!(dpkg_status(&root), "iU", "dpkg should leave the 2.3 package unpacked, not configured");
    root.ok(&["dpkg", "--purge", "maildir-backup"]);
    root.ok(&["doveadm", "mailbox", "list", "-u", "alice"]);
}
