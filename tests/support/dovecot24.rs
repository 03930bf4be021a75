//! A private, real Dovecot **2.4** instance for integration tests, running inside a Debian 13 (trixie) root.
//!
//! The host (Debian 12) has Dovecot 2.3; 2.4 comes from a debootstrapped trixie tree `ROOT` built once by
//! `scripts/trixie-root.sh` (see [`root`]; `ROOT` = `$MB_TRIXIE_ROOT` or `/var/cache/maildir-backup/trixie`).
//! Every Dovecot process runs as `chroot ROOT <prog> -c /srv/mbt-XXXXXX/dovecot.conf ...`. The chroot shares
//! the host's network, pid and UTS namespaces, so IMAP on `127.0.0.1:PORT` is reachable from the host, pids
//! are the same on both sides and a dotlock written by the host (`<pid>:<hostname>`, e.g.
//! [`super::dovecot::fake_uidlist_lock`] on a host path) is understood by the 2.4 processes.
//!
//! [`Dovecot24`] mirrors the 2.3 [`super::dovecot::Dovecot`] API and takes the same
//! [`DovecotOptions`]. **Paths:** every path it returns ([`Dovecot24::dir`], [`Dovecot24::maildir`],
//! [`Dovecot24::mailbox_path`], ...) is a *host* path (`ROOT/srv/mbt-XXXXXX/...`) that the test can read
//! and write directly. The same file as seen by Dovecot (inside the chroot) is [`host_to_root`]`(p)`
//! (`/srv/mbt-XXXXXX/...`); [`root_path`] converts back. Arguments given to [`Dovecot24::doveadm`] are passed
//! verbatim, so paths in them must be chroot paths. Anything Dovecot must see (a backup to read) has to live
//! inside `ROOT`: use a directory under [`Dovecot24::dir`] or [`tempdir_in_root`].
//!
//! Layout of the instance dir `D` = `ROOT/srv/mbt-XXXXXX` (chroot: `/srv/mbt-XXXXXX`): as in 2.3 —
//! `dovecot.conf`, `passwd`, `run/`, `state/`, `dovecot.log`, `dovecot.stderr`, `mail/<user>/Maildir`, and
//! with `control: true` `control/<user>` and `index/<user>`.
//!
//! 2.4 settings used (2.3 equivalent in brackets): `mail_driver = maildir` + `mail_path =
//! /srv/…/mail/%{user}/Maildir` [`mail_location = maildir:…/%u/Maildir`]; `control: true` adds
//! `mail_control_path` + `mail_index_path` [`:CONTROL=…:INDEX=…`]; `layout_fs: true` sets
//! `mailbox_list_layout = fs` [`:LAYOUT=fs`] (it must be explicit: the `maildir` driver's built-in default
//! is `maildir++`); `passdb/userdb passwd-file { passwd_file_path }` [`driver/args`];
//! `auth_allow_cleartext = yes` [`disable_plaintext_auth = no`]; `inet_listener { listen = 127.0.0.1 }`
//! [`address`].
//!
//! Mounts: [`root`] mounts `proc` on `ROOT/proc` if it is not mounted yet (checked in `/proc/mounts`, under
//! an flock so parallel test processes mount it once) and **never unmounts it**: instances of other tests
//! or other test processes may be using it at any time, and a proc mount is harmless. It stays mounted until
//! someone runs `umount ROOT/proc` (or the machine reboots); `scripts/trixie-root.sh` unmounts it only
//! when it has to delete and rebuild a stale root. `/dev` is *not* mounted: debootstrap creates the static
//! nodes Dovecot uses (`null`, `zero`, `urandom`, `random`, `tty`), which is enough (checked: start,
//! IMAP, doveadm, dovecot-lda).
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::dovecot::{
    free_port, message, populate_flags, DovecotOptions, PASSWORD,
};
use super::dovecot_common::{
    append_passwd, child_running, command_failed, conf_tail, create_mail_dirs, keep_or_remove,
    log_tail, shell_line, stop_master, wait_for_user, write_passwd, STATS_SERVICE,
};
pub use super::dovecot_common::{descendants, pid_alive};
use super::imap::Imap;

/// Paths of the programs inside the root.
pub const DOVECOT24_BIN: &str = "/usr/sbin/dovecot";
pub const DOVEADM24_BIN: &str = "/usr/bin/doveadm";
pub const LDA24_BIN: &str = "/usr/lib/dovecot/dovecot-lda";

// ---------------------------------------------------------------------------------------------------------
// The root

/// The Debian 13 root (canonical host path). The first call in a test process runs
/// `scripts/trixie-root.sh` (builds the root if needed, ~45-55 s and ~300 MB the first time; prints the
/// path) and mounts `ROOT/proc` if needed (see the module docs: never unmounted). Panics if it cannot.
pub fn root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/trixie-root.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !out.status.success() {
            panic!("{} failed ({})", script.display(), out.status);
        }
        let printed = String::from_utf8_lossy(&out.stdout);
        let path = printed
            .lines()
            .last()
            .map(str::trim)
            .filter(|l| l.starts_with('/'))
            .unwrap_or_else(|| panic!("{} printed no root path: {printed:?}", script.display()));
        let root = fs::canonicalize(path).unwrap_or_else(|e| panic!("canonicalize {path}: {e}"));
        ensure_proc_mounted(&root);
        root
    })
    .clone()
}

/// Whether `mountpoint` appears in /proc/mounts (octal escapes decoded).
fn is_mounted(mountpoint: &Path) -> bool {
    let want = mountpoint.to_string_lossy();
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|mp| unescape_mount(mp) == want)
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount proc on ROOT/proc unless already mounted. Serialized across processes with flock(ROOT.mount.lock)
/// so that parallel test binaries do not stack two mounts.
fn ensure_proc_mounted(root: &Path) {
    let target = root.join("proc");
    if is_mounted(&target) {
        return;
    }
    let lock_path = PathBuf::from(format!("{}.mount.lock", root.display()));
    let lock = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    if is_mounted(&target) {
        return;
    }
    let out = Command::new("mount")
        .args(["-t", "proc", "proc"])
        .arg(&target)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
    if !out.status.success() {
        panic!(
            "mount -t proc proc {}: {}{}",
            target.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Host path → the same file's path inside the chroot: `ROOT/srv/x` → `/srv/x`. Panics if `host` is not
/// below ROOT (Dovecot could not see it). Relative paths are resolved against the current directory.
pub fn host_to_root(host: &Path) -> PathBuf {
    let root = root();
    let abs = if host.is_absolute() {
        host.to_path_buf()
    } else {
        std::env::current_dir().unwrap().join(host)
    };
    // Compare lexically first (the path may not exist yet), then via canonicalize (symlinked ROOT).
    let rel = abs
        .strip_prefix(&root)
        .map(Path::to_path_buf)
        .ok()
        .or_else(|| {
            fs::canonicalize(&abs)
                .ok()
                .and_then(|c| c.strip_prefix(&root).ok().map(Path::to_path_buf))
        })
        .unwrap_or_else(|| {
            panic!(
                "{} is not inside the 2.4 root {}; Dovecot 2.4 (chrooted) cannot see it",
                host.display(),
                root.display()
            )
        });
    Path::new("/").join(rel)
}

/// Path inside the chroot → host path: `/srv/x` → `ROOT/srv/x`. `inside` must be absolute.
pub fn root_path(inside: &Path) -> PathBuf {
    assert!(
        inside.is_absolute(),
        "root_path needs an absolute chroot path, got {}",
        inside.display()
    );
    root().join(inside.strip_prefix("/").unwrap())
}

/// uid and gid of `vmail` inside the root (created by `scripts/trixie-root.sh`; the host's ids when the
/// host had a vmail user at build time).
pub fn vmail_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = root().join("etc/passwd");
        let text =
            fs::read_to_string(&passwd).unwrap_or_else(|e| panic!("{}: {e}", passwd.display()));
        text.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() >= 4 && f[0] == "vmail" {
                    Some((f[2].parse().ok()?, f[3].parse().ok()?))
                } else {
                    None
                }
            })
            .unwrap_or_else(|| panic!("no vmail user in {}", passwd.display()))
    })
}

/// chown a host path and everything below it (no symlink following) to the root's vmail:vmail.
pub fn chown_vmail_recursive_root(path: &Path) {
    let (uid, gid) = vmail_ids();
    fn walk(p: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        if md.is_dir() {
            for e in fs::read_dir(p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
                walk(&e.unwrap().path(), uid, gid);
            }
        }
    }
    walk(path, uid, gid);
}

/// A fresh temporary directory `ROOT/srv/mbt-XXXXXX` (mode 0755), visible to Dovecot 2.4 as
/// `/srv/mbt-XXXXXX`. Removed on drop.
pub fn tempdir_in_root() -> tempfile::TempDir {
    let base = root().join("srv");
    fs::create_dir_all(&base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
    let t = tempfile::Builder::new()
        .prefix("mbt-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("tempdir in {}: {e}", base.display()));
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// Pids of all processes whose root directory is ROOT (i.e. running chrooted in it), any instance.
pub fn processes_in_root() -> Vec<u32> {
    let root = root();
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(r) = fs::read_link(format!("/proc/{pid}/root")) {
                if r == root && pid_alive(pid) {
                    out.push(pid);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// The 2.4 `doveadm -o` settings equivalent to a 2.3 `mail_location` string whose paths are HOST paths,
/// as `key=value` strings (paths translated with [`host_to_root`]).
///
/// Accepted: `[maildir:]PATH[:LAYOUT=fs|maildir++][:INDEX=PATH|MEMORY][:CONTROL=PATH][:INBOX=PATH]`.
/// The 2.3 semantics are kept: a `mail_location` override replaces the *whole* location, so everything not
/// given falls back to the defaults, never to the instance's own settings. Hence the result always sets
/// `mail_driver=maildir`, `mail_path=…`, `mailbox_list_layout=` (`maildir++` unless `LAYOUT=fs`),
/// `mail_index_path=` (empty = in the Maildir, or `MEMORY`) and `mail_control_path=` (empty = in the
/// Maildir). Leaving out the last two would be a trap on 2.4: a `control: true` instance would then read
/// (and write) the *live* `dovecot-uidlist` from its control dir for the backup's mails.
/// `mail_inbox_path` is only set with `INBOX=` (the maildir driver's built-in `.` is right otherwise).
pub fn location_overrides(location: &str) -> Vec<String> {
    let loc = location.strip_prefix("maildir:").unwrap_or(location);
    let mut parts = loc.split(':');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| panic!("location override {location:?} has no path"));
    let tr = |p: &str| host_to_root(Path::new(p)).display().to_string();
    let mut layout = "maildir++".to_string();
    let mut index = String::new();
    let mut control = String::new();
    let mut inbox = None;
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .unwrap_or_else(|| panic!("bad part {p:?} in location override {location:?}"));
        match k.to_ascii_uppercase().as_str() {
            "LAYOUT" => layout = v.to_string(),
            "INDEX" if v.eq_ignore_ascii_case("MEMORY") => index = "MEMORY".to_string(),
            "INDEX" => index = tr(v),
            "CONTROL" => control = tr(v),
            "INBOX" => inbox = Some(tr(v)),
            _ => panic!("unsupported key {k:?} in location override {location:?}"),
        }
    }
    let mut v = vec![
        "mail_driver=maildir".to_string(),
        format!("mail_path={}", tr(path)),
        format!("mailbox_list_layout={layout}"),
        format!("mail_index_path={index}"),
        format!("mail_control_path={control}"),
    ];
    if let Some(i) = inbox {
        v.push(format!("mail_inbox_path={i}"));
    }
    v
}

// ---------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------

/// A running private Dovecot 2.4 in the trixie root. Stopped (only its own master pid, plus any of that
/// master's former children still alive after it exits) and its directory removed on drop (kept and
/// printed when `MB_KEEP_TEST_DIRS` is set).
pub struct Dovecot24 {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    /// Host path of the instance dir.
    dir: PathBuf,
    /// The same dir inside the chroot.
    cdir: PathBuf,
    port: u16,
    opts: DovecotOptions,
    conf: PathBuf,
    instance: String,
    child: Option<Child>,
    master_pid: Option<u32>,
    /// Descendants of the master seen so far (refreshed by [`Self::stop`] before signalling).
    kids: Vec<u32>,
}

impl Dovecot24 {
    /// Configure and start a new instance in `ROOT/srv/mbt-XXXXXX`; returns once 127.0.0.1:port answers
    /// `* OK`. Builds the root first if needed (see [`root`]). Panics (with the log tail) on failure.
    pub fn start(opts: DovecotOptions) -> Dovecot24 {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = root();
        let (vuid, vgid) = vmail_ids();
        let tmp = tempdir_in_root();
        let dir = tmp.path().to_path_buf();
        let cdir = host_to_root(&dir);
        create_mail_dirs(&dir, opts.control, vuid, vgid);
        let instance = format!(
            "mbt24-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let conf = dir.join("dovecot.conf");
        let mut d = Dovecot24 {
            tmp: Some(tmp),
            root,
            dir,
            cdir,
            port: 0,
            opts,
            conf,
            instance,
            child: None,
            master_pid: None,
            kids: Vec::new(),
        };
        write_passwd(&d.passwd_path(), &d.opts.users);

        for attempt in 0.. {
            d.port = free_port();
            fs::write(d.conf(), d.render_conf()).unwrap();
            match d.spawn_and_wait() {
                Ok(()) => return d,
                Err(_) if d.log_tail().contains("Address already in use") && attempt < 5 => {
                    d.stop();
                    eprintln!("dovecot 2.4 test instance: port {} taken, retrying", d.port);
                    continue;
                }
                Err(msg) => {
                    d.stop();
                    panic!(
                        "starting dovecot 2.4 in {} failed: {msg}\n{}",
                        d.dir.display(),
                        d.log_tail()
                    );
                }
            }
        }
        unreachable!()
    }

    fn passwd_path(&self) -> PathBuf {
        self.dir.join("passwd")
    }

    /// The 2.4 mail settings of this instance, chroot paths, `%{user}` unexpanded when `user` is
    /// `"%{user}"`: `[("mail_driver","maildir"), ("mail_path", "/srv/…/mail/USER/Maildir"), …]`.
    pub fn mail_settings(&self, user: &str) -> Vec<(&'static str, String)> {
        let c = self.cdir.display();
        let mut v = vec![
            ("mail_driver", "maildir".to_string()),
            ("mail_path", format!("{c}/mail/{user}/Maildir")),
        ];
        if self.opts.control {
            v.push(("mail_control_path", format!("{c}/control/{user}")));
            v.push(("mail_index_path", format!("{c}/index/{user}")));
        }
        if self.opts.layout_fs {
            v.push(("mailbox_list_layout", "fs".to_string()));
        }
        v
    }

    fn render_conf(&self) -> String {
        let c = self.cdir.display();
        let o = &self.opts;
        let mail: String = self
            .mail_settings("%{user}")
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        format!(
            r#"dovecot_config_version = 2.4.1
# maildir-backup test instance (generated by tests/support/dovecot24.rs). The line above must be the
# first non-comment line.
dovecot_storage_version = 2.4.1
base_dir = {c}/run
state_dir = {c}/state
log_path = {c}/dovecot.log
info_log_path = {c}/dovecot.log
debug_log_path = {c}/dovecot.log
instance_name = {inst}
protocols = imap
listen = 127.0.0.1
ssl = no
auth_allow_cleartext = yes
auth_mechanisms = plain

service imap-login {{
  inet_listener imap {{
    listen = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{stats}
passdb passwd-file {{
  passwd_file_path = {c}/passwd
}}
userdb passwd-file {{
  passwd_file_path = {c}/passwd
}}

mail_uid = vmail
mail_gid = vmail
first_valid_uid = 1
first_valid_gid = 1
{mail}{tail}"#,
            inst = self.instance,
            port = self.port,
            stats = STATS_SERVICE,
            tail = conf_tail(o.nfs, o.excl, self.separator(), &o.extra_conf),
        )
    }

    fn chroot_cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.root).arg(prog);
        c
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let _ = fs::remove_file(self.dir.join("dovecot.log"));
        let errf = fs::File::create(self.dir.join("dovecot.stderr")).unwrap();
        // chroot(8) execs the program, so the child's pid is the master's pid.
        let child = self
            .chroot_cmd(DOVECOT24_BIN)
            .arg("-F")
            .arg("-c")
            .arg(self.conf_in_root())
            .stdin(Stdio::null())
            .stdout(errf.try_clone().unwrap())
            .stderr(errf)
            .spawn()
            .map_err(|e| format!("cannot run chroot {DOVECOT24_BIN}: {e}"))?;
        self.master_pid = Some(child.id());
        self.child = Some(child);
        super::dovecot::wait_until_serving(&mut self.child, &mut self.master_pid, self.port, &self.dir)
    }

    /// The instance directory as seen from the HOST (`ROOT/srv/mbt-XXXXXX`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The instance directory as seen by Dovecot, inside the chroot (`/srv/mbt-XXXXXX`).
    pub fn dir_in_root(&self) -> &Path {
        &self.cdir
    }
    /// The trixie root this instance runs in.
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Host path of dovecot.conf.
    pub fn conf(&self) -> &Path {
        &self.conf
    }
    /// dovecot.conf as seen inside the chroot (what `-c` gets).
    pub fn conf_in_root(&self) -> PathBuf {
        self.cdir.join("dovecot.conf")
    }
    pub fn options(&self) -> &DovecotOptions {
        &self.opts
    }
    pub fn instance_name(&self) -> &str {
        &self.instance
    }
    /// The master's pid while running (same number on host and in the chroot).
    pub fn master_pid(&self) -> Option<u32> {
        self.master_pid
    }
    /// Hierarchy separator of the inbox namespace: `.` (Maildir++) or `/` (layout fs).
    pub fn separator(&self) -> char {
        if self.opts.layout_fs {
            '/'
        } else {
            '.'
        }
    }

    /// Host path of `user`'s root Maildir (`ROOT/srv/…/mail/user/Maildir`).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.join("mail").join(user).join("Maildir")
    }
    /// Host path of `user`'s control root — only meaningful with `control: true`.
    pub fn control_root(&self, user: &str) -> PathBuf {
        self.dir.join("control").join(user)
    }
    /// Host path of `user`'s index root — only meaningful with `control: true`.
    pub fn index_root(&self, user: &str) -> PathBuf {
        self.dir.join("index").join(user)
    }

    /// `doveadm mailbox path -u USER -t KIND MAILBOX` (kind: "mailbox", "control", "index"), converted to
    /// a host path.
    pub fn mailbox_path(&self, user: &str, mailbox: &str, kind: &str) -> PathBuf {
        let out = self.doveadm_ok(&["mailbox", "path", "-u", user, "-t", kind, mailbox]);
        root_path(Path::new(out.trim_end_matches('\n')))
    }

    /// Append a user (password [`PASSWORD`]) and wait until auth sees it.
    pub fn add_user(&self, user: &str) {
        append_passwd(&self.passwd_path(), user);
        if self.child.is_none() {
            return;
        }
        wait_for_user(
            user,
            |a| self.doveadm(a),
            |out| self.command_failed(&self.doveadm_line(&["user", user]), out),
        );
    }

    /// Run `chroot ROOT doveadm -c /srv/…/dovecot.conf ARGS...`. Global options (`-o k=v`, `-f tab`) go first
    /// in ARGS; paths in ARGS must be chroot paths ([`host_to_root`]).
    pub fn doveadm(&self, args: &[&str]) -> Output {
        self.chroot_cmd(DOVEADM24_BIN)
            .arg("-c")
            .arg(self.conf_in_root())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run chroot {DOVEADM24_BIN}: {e}"))
    }

    /// [`Self::doveadm`], panicking with command line, status, stderr and the log tail unless it succeeds.
    /// Returns stdout.
    pub fn doveadm_ok(&self, args: &[&str]) -> String {
        let out = self.doveadm(args);
        if !out.status.success() {
            self.command_failed(&self.doveadm_line(args), &out);
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn doveadm_line(&self, args: &[&str]) -> String {
        let conf = self.conf_in_root();
        let root = self.root.display().to_string();
        let mut all = vec![root.as_str(), DOVEADM24_BIN, "-c", conf.to_str().unwrap()];
        all.extend_from_slice(args);
        shell_line("chroot", &all, "{}")
    }

    /// Panic with everything useful about a failed command.
    pub fn command_failed(&self, cmdline: &str, out: &Output) -> ! {
        command_failed(cmdline, out, &self.log_tail())
    }

    /// An IMAP connection logged in as `user` (password [`PASSWORD`]).
    pub fn imap(&self, user: &str) -> Imap {
        let mut i = Imap::connect(self.port);
        i.login(user, PASSWORD);
        i
    }

    /// Deliver `message` with `chroot ROOT dovecot-lda -c conf -d user [-m mailbox]` (autocreate on).
    pub fn deliver(&self, user: &str, mailbox: Option<&str>, message: &[u8]) {
        let conf = self.conf_in_root();
        let mut args = vec!["-c", conf.to_str().unwrap(), "-d", user];
        if let Some(m) = mailbox {
            args.extend_from_slice(&["-m", m]);
        }
        let mut child = self
            .chroot_cmd(LDA24_BIN)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run chroot {LDA24_BIN}: {e}"));
        let write_res = child.stdin.take().unwrap().write_all(message);
        let out = child.wait_with_output().unwrap();
        if !out.status.success() || write_res.is_err() {
            let root = self.root.display().to_string();
            let mut all = vec![root.as_str(), LDA24_BIN];
            all.extend_from_slice(&args);
            self.command_failed(
                &format!("{} < message ({write_res:?})", shell_line("chroot", &all, "{}")),
                &out,
            );
        }
    }

    /// `doveadm mailbox create -u user name`.
    pub fn create_mailbox(&self, user: &str, name: &str) {
        self.doveadm_ok(&["mailbox", "create", "-u", user, name]);
    }

    /// Bulk load like [`super::dovecot::populate`] (same messages, flags and UIDs), for a 2.4 instance.
    pub fn populate(&self, user: &str, folders: &[&str], per_folder: usize) {
        let mut imap = self.imap(user);
        for f in folders {
            if f.eq_ignore_ascii_case("INBOX") {
                continue;
            }
            if let Err(e) = imap.command(&format!("CREATE {}", super::imap::imap_quote(f))) {
                if !e.contains("ALREADYEXISTS") {
                    panic!("populate: CREATE {f} failed: {e}\n{}", self.log_tail());
                }
            }
        }
        for (k, f) in folders.iter().enumerate() {
            let msgs: Vec<(String, Vec<u8>)> = (0..per_folder)
                .map(|j| {
                    let i = k * per_folder + j;
                    (populate_flags(j), message(i, 500 + (i * 397) % 3000))
                })
                .collect();
            let refs: Vec<(&str, &[u8])> = msgs
                .iter()
                .map(|(fl, m)| (fl.as_str(), m.as_slice()))
                .collect();
            imap.append_many(f, &refs).unwrap_or_else(|e| {
                panic!("populate: APPEND to {f} failed: {e}\n{}", self.log_tail())
            });
        }
        imap.logout();
    }

    /// `(uid, flags)` of every message in `mailbox` as Dovecot 2.4 sees it, sorted by uid; flags sorted,
    /// `\Recent` removed.
    ///
    /// `location_override` has the **2.3 `mail_location` syntax with host paths**, exactly what one would
    /// give the 2.3 harness, e.g. `maildir:/ROOT/srv/…/backup/Maildir:INDEX=MEMORY` or
    /// `…:LAYOUT=fs:INDEX=MEMORY`; a bare path means `maildir:PATH`. It is translated by
    /// [`location_overrides`] into 2.4 `-o` settings with chroot paths, so the command run is e.g.
    /// `chroot ROOT doveadm -c … -o mail_driver=maildir -o mail_path=/srv/…/backup/Maildir
    /// -o mailbox_list_layout=maildir++ -o mail_index_path=MEMORY -o mail_control_path=
    /// -f tab fetch -u USER 'uid flags' mailbox MAILBOX`. As in 2.3, only what the override names is used:
    /// the instance's own layout/control/index settings are reset (see [`location_overrides`]). The backup
    /// must be inside ROOT and vmail-writable ([`chown_vmail_recursive_root`]); without `INDEX=MEMORY`
    /// Dovecot writes index files into it. For raw 2.4 settings use [`Self::fetch_uid_flags_with`].
    ///
    /// Careful (same in 2.3): a mailbox that does not exist at the override location is not an error —
    /// `fetch ... mailbox X` is a search and simply returns no rows.
    pub fn fetch_uid_flags(
        &self,
        user: &str,
        mailbox: &str,
        location_override: Option<&str>,
    ) -> Vec<(u32, String)> {
        let ov = location_override
            .map(location_overrides)
            .unwrap_or_default();
        self.fetch_uid_flags_with(user, mailbox, &ov)
    }

    /// [`Self::fetch_uid_flags`] with raw 2.4 settings: each element `key=value` becomes `-o key=value`
    /// (values verbatim — chroot paths).
    pub fn fetch_uid_flags_with(
        &self,
        user: &str,
        mailbox: &str,
        overrides: &[String],
    ) -> Vec<(u32, String)> {
        super::dovecot_common::fetch_uid_flags(|a| self.doveadm_ok(a), user, mailbox, overrides)
    }

    /// Last 80 lines of dovecot.log (plus dovecot.stderr if not empty), with a heading.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir, "dovecot 2.4")
    }

    pub fn is_running(&mut self) -> bool {
        child_running(self.child.as_mut())
    }

    /// Pids of this instance's processes: the master and its descendants (live ones only).
    pub fn processes(&self) -> Vec<u32> {
        let Some(pid) = self.master_pid else {
            return Vec::new();
        };
        let mut v: Vec<u32> = std::iter::once(pid)
            .chain(descendants(pid))
            .filter(|&p| pid_alive(p))
            .collect();
        v.sort_unstable();
        v
    }

    /// Every pid this instance ever had that [`Self::stop`] saw (master + descendants at stop time).
    /// After `stop()` none of them should be alive.
    pub fn known_pids(&self) -> &[u32] {
        &self.kids
    }

    /// Stop this instance: SIGTERM to its master pid only (SIGKILL after 15 s), wait for it and for its
    /// former children to disappear (SIGKILL to those left after 10 s). Idempotent; never panics.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        let pid = self.master_pid.take().unwrap_or(child.id());
        let kids = descendants(pid);
        self.kids = std::iter::once(pid).chain(kids.iter().copied()).collect();
        stop_master(child, pid, &kids, "dovecot 2.4", &self.dir);
    }
}

impl Drop for Dovecot24 {
    fn drop(&mut self) {
        self.stop();
        keep_or_remove(self.tmp.take(), "dovecot 2.4");
    }
}
