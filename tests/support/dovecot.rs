//! A private, real Dovecot for integration tests, of either release: [`Dovecot`] is 2.3 on the host,
//! `Dovecot24` is 2.4 in the Debian 13 root (tests/support/trixie.rs). Both are an [`Instance`] of a
//! [`Release`] ([`V23`] here, `V24` in trixie.rs): one harness, the release supplying only what differs
//! (programs and how they are started, paths as Dovecot sees them, the configuration dialect).
//!
//! Each instance owns a fresh directory `D` and a free port `P` on 127.0.0.1, and reads nothing from
//! `/etc/dovecot`: every `dovecot`, `doveadm` and `dovecot-lda` call gets `-c D/dovecot.conf`.
//!
//! Layout of `D` (2.3: a [`tempdir`]; 2.4: `ROOT/srv/mbt-XXXXXX`, inside the chroot `/srv/mbt-XXXXXX`):
//! - `dovecot.conf`, `passwd` (passwd-file for passdb and userdb; every user's password is [`PASSWORD`])
//! - `run/` (base_dir, `run/master.pid`), `state/` (state_dir), `dovecot.log` (all logging), `dovecot.stderr`
//! - `mail/<user>/Maildir` — the mail root
//! - with `control: true`: `control/<user>` and `index/<user>`
//!
//! **Paths:** every path an instance returns ([`Instance::dir`], [`Instance::maildir`],
//! [`Instance::mailbox_path`], ...) is a *host* path that the test can read and write directly. Arguments
//! given to [`Instance::doveadm`] are passed verbatim, so for 2.4 paths in them must be chroot paths
//! (`trixie::host_to_root`); [`Instance::dir_in_root`] and [`Instance::conf_in_root`] are the
//! instance's own (the same as the host paths on 2.3).
//!
//! Mail settings (2.3 / 2.4): `mail_location = maildir:D/mail/%u/Maildir` / `mail_driver = maildir` +
//! `mail_path = D/mail/%{user}/Maildir`; `control: true` adds `:CONTROL=D/control/%u:INDEX=D/index/%u` /
//! `mail_control_path` + `mail_index_path`; `layout_fs: true` adds `:LAYOUT=fs` / `mailbox_list_layout = fs`
//! (explicit: the 2.4 `maildir` driver's default is `maildir++`). Other dialect differences: passdb/userdb
//! `driver/args` / `passwd-file { passwd_file_path }`, `disable_plaintext_auth = no` /
//! `auth_allow_cleartext = yes`, listener `address` / `listen`.
//!
//! Namespace: a single `inbox` namespace (`inbox = yes`, no prefix). Hierarchy separator is `.` for the
//! default Maildir++ layout (folder `Archive.2024` lives in `Maildir/.Archive.2024/`) and `/` for
//! `layout_fs` (folder `Archive/2024` lives in `Maildir/Archive/2024/`). See [`Instance::separator`].
//!
//! Mail processes run as the `vmail` user (Dovecot refuses uid 0 for mail access), so everything a Dovecot
//! process must write — the mail root, a backup that Dovecot should read — must be owned by vmail
//! ([`chown_vmail_recursive`]; 2.4: `trixie::chown_vmail_recursive_root`).

use std::fs;
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::dovecot_common::{descendants, ensure_vmail, free_port, normalize_flags, pid_alive, signal};
use super::imap::Imap;

// What examples/demo.rs (which includes this file as `dovecot`) takes from here.
#[allow(unused_imports)]
pub use super::dovecot_common::{chown_vmail_recursive, message, populate, tempdir};

/// Password of every user in the instance's passwd file.
pub const PASSWORD: &str = "secret";
/// The host's (2.3) local delivery agent (Debian path).
pub const LDA_BIN: &str = V23::LDA_BIN;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Dovecot 2.3 on the host. (Dovecot 2.4 is `super::trixie::Dovecot24`.)
pub type Dovecot = Instance<V23>;

// ---------------------------------------------------------------------------------------------------------
// What differs between releases

/// A Dovecot release the harness can run: where its programs are and how they are started, how paths look
/// to it, and its configuration dialect. Everything else is [`Instance`]'s, the same for all releases.
pub trait Release: Sized + 'static {
    /// How messages name the server.
    const NAME: &'static str;
    /// Prefix of `instance_name`.
    const INSTANCE_PREFIX: &'static str;
    /// The user name variable in configuration values (`%u`, `%{user}`).
    const USER_VAR: &'static str;
    /// Programs, as paths inside the release's root.
    const DOVECOT_BIN: &'static str;
    const DOVEADM_BIN: &'static str;
    const LDA_BIN: &'static str;
    /// Start of dovecot.conf.
    const CONF_HEAD: &'static str;
    /// The setting that allows plain-text passwords without TLS.
    const CLEARTEXT_AUTH: &'static str;
    /// The key of an inet_listener's address.
    const LISTENER_ADDRESS: &'static str;

    /// uid and gid of `vmail` as the release's processes know it.
    fn vmail_ids() -> (u32, u32);
    /// A fresh instance directory (host path) that the release's processes can see.
    fn tempdir() -> tempfile::TempDir;
    /// A host path as the release's processes see it.
    fn inside(host: &Path) -> PathBuf;
    /// A path printed by the release's processes as a host path.
    fn host(inside: &Path) -> PathBuf;
    /// The words that start `prog` (a path inside the release's root).
    fn command_words(prog: &str) -> Vec<String>;
    /// passdb and userdb blocks reading the passwd-file `passwd` (a path inside).
    fn passwd_dbs(passwd: &str) -> String;
    /// The mail settings of an instance with `opts` in `dir` (a path inside) for `user` (or the unexpanded
    /// [`Self::USER_VAR`]).
    fn mail_settings(opts: &DovecotOptions, dir: &Path, user: &str) -> Vec<(&'static str, String)>;
    /// `doveadm -o` settings that read a 2.3-style `mail_location` with host paths (`maildir:PATH[:…]`) as
    /// the whole location, nothing inherited from the instance.
    fn location_overrides(location: &str) -> Vec<String>;
}

/// Dovecot 2.3, the host's own.
pub struct V23;

impl Release for V23 {
    const NAME: &'static str = "dovecot";
    const INSTANCE_PREFIX: &'static str = "mbt";
    const USER_VAR: &'static str = "%u";
    const DOVECOT_BIN: &'static str = "dovecot";
    const DOVEADM_BIN: &'static str = "doveadm";
    const LDA_BIN: &'static str = "/usr/lib/dovecot/dovecot-lda";
    const CONF_HEAD: &'static str = "# maildir-backup test instance (generated by tests/support/dovecot.rs)\n";
    const CLEARTEXT_AUTH: &'static str = "disable_plaintext_auth = no";
    const LISTENER_ADDRESS: &'static str = "address";

    fn vmail_ids() -> (u32, u32) {
        ensure_vmail()
    }
    fn tempdir() -> tempfile::TempDir {
        tempdir()
    }
    fn inside(host: &Path) -> PathBuf {
        host.to_path_buf()
    }
    fn host(inside: &Path) -> PathBuf {
        inside.to_path_buf()
    }
    fn command_words(prog: &str) -> Vec<String> {
        vec![prog.to_string()]
    }
    fn passwd_dbs(passwd: &str) -> String {
        format!("passdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\nuserdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n")
    }
    fn mail_settings(opts: &DovecotOptions, dir: &Path, user: &str) -> Vec<(&'static str, String)> {
        let d = dir.display();
        let mut s = format!("maildir:{d}/mail/{user}/Maildir");
        if opts.control {
            s.push_str(&format!(":CONTROL={d}/control/{user}:INDEX={d}/index/{user}"));
        }
        if opts.layout_fs {
            s.push_str(":LAYOUT=fs");
        }
        vec![("mail_location", s)]
    }
    fn location_overrides(location: &str) -> Vec<String> {
        vec![format!("mail_location={location}")]
    }
}

/// What `sh -c` runs in [`bind_mounted`]: bind-mounts `$0` over `$1`, then runs the rest.
pub const BIND_THEN_EXEC: &str = r#"mount --bind "$0" "$1" && shift && exec "$@""#;

/// `unshare -m sh -c …`: a private mount namespace with host dir `dir` bind-mounted over `over`, where the
/// program and arguments added to the returned command run (nothing changes for anyone else).
pub fn bind_mounted(dir: &Path, over: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c", BIND_THEN_EXEC]).arg(dir).arg(over);
    c
}

/// A [`Command`] running `prog` of release `R`.
pub fn release_command<R: Release>(prog: &str) -> Command {
    let words = R::command_words(prog);
    let mut c = Command::new(&words[0]);
    c.args(&words[1..]);
    c
}

// ---------------------------------------------------------------------------------------------------------
// Options

/// How to configure an instance.
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// Split control and index files out of the Maildir (`D/control/%u`, `D/index/%u`).
    pub control: bool,
    /// Folders as nested directories (separator `/`) instead of Maildir++ (separator `.`).
    pub layout_fs: bool,
    /// `mail_nfs_storage = yes`.
    pub nfs: bool,
    /// `dotlock_use_excl`. Always written explicitly: `true` → `yes` (O_EXCL lock creation; this is
    /// Dovecot 2.3's built-in default and the default here), `false` → `no` (link()-based dotlocks).
    pub excl: bool,
    /// Users in the passwd file (password [`PASSWORD`]). Default `["alice"]`.
    pub users: Vec<String>,
    /// Appended verbatim at the end of dovecot.conf (later settings win).
    pub extra_conf: String,
    /// `(dir, over)`: the master runs in a private mount namespace with host dir `dir` bind-mounted
    /// over `over` (a doveadm module dir, so that its doveadm server loads our plugin).
    pub master_bind: Option<(PathBuf, PathBuf)>,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        DovecotOptions {
            control: false,
            layout_fs: false,
            nfs: false,
            excl: true,
            users: vec!["alice".to_string()],
            extra_conf: String::new(),
            master_bind: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The instance

/// A running private Dovecot of release `R`. Stopped (only its own master pid, plus any of that master's
/// former children still alive after it exits) and its directory removed on drop (kept and printed when
/// `MB_KEEP_TEST_DIRS` is set).
pub struct Instance<R: Release> {
    tmp: Option<tempfile::TempDir>,
    /// Host path of the instance dir.
    dir: PathBuf,
    /// The same dir as Dovecot sees it.
    cdir: PathBuf,
    port: u16,
    opts: DovecotOptions,
    instance: String,
    child: Option<Child>,
    master_pid: Option<u32>,
    /// The master and its descendants as [`Self::stop`] saw them before signalling.
    kids: Vec<u32>,
    release: PhantomData<R>,
}

impl<R: Release> Instance<R> {
    /// Configure and start a new instance; returns once 127.0.0.1:port answers `* OK`. Panics (with the log
    /// tail) on failure.
    pub fn start(opts: DovecotOptions) -> Instance<R> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let (vuid, vgid) = R::vmail_ids();
        let tmp = R::tempdir();
        let dir = tmp.path().to_path_buf();
        let cdir = R::inside(&dir);
        let mut owned = vec![dir.join("mail")];
        if opts.control {
            owned.push(dir.join("control"));
            owned.push(dir.join("index"));
        }
        for p in &owned {
            fs::create_dir(p).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(p, Some(vuid), Some(vgid)).unwrap();
        }
        let instance = format!("{}-{}-{}", R::INSTANCE_PREFIX, std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let mut d = Instance {
            tmp: Some(tmp),
            dir,
            cdir,
            port: 0,
            opts,
            instance,
            child: None,
            master_pid: None,
            kids: Vec::new(),
            release: PhantomData,
        };
        let passwd: String = d.opts.users.iter().map(|u| format!("{u}:{{PLAIN}}{PASSWORD}:::::\n")).collect();
        fs::write(d.passwd_path(), passwd).unwrap();
        fs::set_permissions(d.passwd_path(), fs::Permissions::from_mode(0o644)).unwrap();

        for attempt in 0.. {
            d.port = free_port();
            fs::write(d.conf(), d.render_conf()).unwrap();
            match d.spawn_and_wait() {
                Ok(()) => return d,
                Err(_) if d.log_tail().contains("Address already in use") && attempt < 5 => {
                    d.stop();
                    eprintln!("{} test instance: port {} taken, retrying", R::NAME, d.port);
                    continue;
                }
                Err(msg) => {
                    d.stop();
                    panic!("starting {} in {} failed: {msg}\n{}", R::NAME, d.dir.display(), d.log_tail());
                }
            }
        }
        unreachable!()
    }

    fn passwd_path(&self) -> PathBuf {
        self.dir.join("passwd")
    }

    fn render_conf(&self) -> String {
        let c = self.cdir.display();
        let o = &self.opts;
        let mail: String = self.mail_settings(R::USER_VAR).iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        format!(
            r#"{head}base_dir = {c}/run
state_dir = {c}/state
log_path = {c}/dovecot.log
info_log_path = {c}/dovecot.log
debug_log_path = {c}/dovecot.log
instance_name = {inst}
protocols = imap
listen = 127.0.0.1
ssl = no
{cleartext}
auth_mechanisms = plain

service imap-login {{
  inet_listener imap {{
    {address} = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
# mail processes run as vmail and report to stats; avoid "Permission denied" noise in the log.
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}

{dbs}
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 1
first_valid_gid = 1
{mail}mail_fsync = never
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
            head = R::CONF_HEAD,
            cleartext = R::CLEARTEXT_AUTH,
            address = R::LISTENER_ADDRESS,
            inst = self.instance,
            port = self.port,
            dbs = R::passwd_dbs(&format!("{c}/passwd")),
            nfs = if o.nfs { "yes" } else { "no" },
            excl = if o.excl { "yes" } else { "no" },
            sep = self.separator(),
            extra = o.extra_conf,
        )
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        // Fresh log files per attempt, so a retry decision only sees this attempt's errors.
        let _ = fs::remove_file(self.dir.join("dovecot.log"));
        let errf = fs::File::create(self.dir.join("dovecot.stderr")).unwrap();
        let mut c = match &self.opts.master_bind {
            Some((dir, over)) => {
                let mut c = bind_mounted(dir, over);
                c.args(R::command_words(R::DOVECOT_BIN));
                c
            }
            None => release_command::<R>(R::DOVECOT_BIN),
        };
        let child = c
            .arg("-F")
            .arg("-c")
            .arg(self.conf_in_root())
            .stdin(Stdio::null())
            .stdout(errf.try_clone().unwrap())
            .stderr(errf)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", R::command_words(R::DOVECOT_BIN).join(" ")))?;
        self.master_pid = Some(child.id());
        self.child = Some(child);
        self.wait_until_serving()
    }

    /// Waits until 127.0.0.1:port greets with `* OK` (then logs out), up to READY_TIMEOUT; forgets the
    /// master if it exits first. Then warns if run/master.pid names another pid than the one spawned.
    fn wait_until_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                self.master_pid = None;
                return Err(format!("dovecot exited early ({st})"));
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = Vec::new();
                let mut b = [0u8; 256];
                while !buf.windows(2).any(|w| w == b"\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                if buf.starts_with(b"* OK") {
                    let _ = s.write_all(b"x LOGOUT\r\n");
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("127.0.0.1:{} did not answer `* OK` within {READY_TIMEOUT:?}", self.port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // With -F the master is our child (2.4: chroot(8) execs it); master.pid should hold the same pid.
        let pidfile = self.dir.join("run/master.pid");
        if let Some(pid) = fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            if Some(pid) != self.master_pid {
                eprintln!("warning: {} says {pid}, spawned {:?}", pidfile.display(), self.master_pid);
            }
        }
        Ok(())
    }

    /// The instance directory D (host path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The instance directory as Dovecot sees it (2.4: inside the chroot, `/srv/mbt-XXXXXX`).
    pub fn dir_in_root(&self) -> &Path {
        &self.cdir
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// D/dovecot.conf (host path).
    pub fn conf(&self) -> PathBuf {
        self.dir.join("dovecot.conf")
    }
    /// dovecot.conf as Dovecot sees it (what `-c` gets).
    pub fn conf_in_root(&self) -> PathBuf {
        self.cdir.join("dovecot.conf")
    }
    pub fn options(&self) -> &DovecotOptions {
        &self.opts
    }
    /// This instance's `instance_name`.
    pub fn instance_name(&self) -> &str {
        &self.instance
    }
    /// The master's pid while running (2.4: the same number on the host and in the chroot).
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

    /// This instance's mail settings for `user` (paths as Dovecot sees them), e.g. for 2.3
    /// `[("mail_location", "maildir:D/mail/alice/Maildir:LAYOUT=fs")]`, for 2.4
    /// `[("mail_driver", "maildir"), ("mail_path", "/srv/…/mail/alice/Maildir"), …]`.
    pub fn mail_settings(&self, user: &str) -> Vec<(&'static str, String)> {
        R::mail_settings(&self.opts, &self.cdir, user)
    }

    /// Root Maildir of `user` (D/mail/user/Maildir); created by Dovecot on first access.
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.join("mail").join(user).join("Maildir")
    }
    /// Control root of `user` (D/control/user) — only meaningful with `control: true`.
    pub fn control_root(&self, user: &str) -> PathBuf {
        self.dir.join("control").join(user)
    }
    /// Index root of `user` (D/index/user) — only meaningful with `control: true`.
    pub fn index_root(&self, user: &str) -> PathBuf {
        self.dir.join("index").join(user)
    }

    /// `doveadm mailbox path -u USER -t KIND MAILBOX` (kind: "mailbox", "control" or "index") as a host
    /// path. (Dovecot prints the path whether or not the mailbox exists.)
    pub fn mailbox_path(&self, user: &str, mailbox: &str, kind: &str) -> PathBuf {
        let out = self.doveadm_ok(&["mailbox", "path", "-u", user, "-t", kind, mailbox]);
        R::host(Path::new(out.trim_end_matches('\n')))
    }

    /// Append a user (password [`PASSWORD`]) to the passwd file and wait until Dovecot's auth sees it.
    /// (passwd-file is re-read without a reload, but auth checks the file at most once per second, so a
    /// lookup right after the append can still say "unknown user".)
    pub fn add_user(&self, user: &str) {
        self.add_user_line(user, &format!("{user}:{{PLAIN}}{PASSWORD}:::::"), "");
    }

    /// Append `user:{PLAIN}secret::::::<extra>` (`extra` is the 8th field: space-separated
    /// `userdb_<field>=<value>`; 2.3 takes e.g. `userdb_mail=maildir:/x/%u/Maildir:LAYOUT=fs`, 2.4 setting
    /// names such as `userdb_mail_path=…`, `userdb_mailbox_list_layout=fs`) and wait until `doveadm user`
    /// returns every one of those fields with its value (the user variable expanded).
    pub fn add_userdb_user(&self, user: &str, extra: &str) {
        self.add_user_line(user, &format!("{user}:{{PLAIN}}{PASSWORD}::::::{extra}"), extra);
    }

    /// [`Self::add_userdb_user`] for many users at once (one append, one wait: for the last).
    pub fn add_userdb_users(&self, users: &[(String, String)]) {
        let Some(((last, last_extra), rest)) = users.split_last() else { return };
        let lines: String = rest.iter().map(|(u, extra)| format!("{u}:{{PLAIN}}{PASSWORD}::::::{extra}\n")).collect();
        fs::OpenOptions::new().append(true).open(self.passwd_path()).unwrap().write_all(lines.as_bytes()).unwrap();
        self.add_userdb_user(last, last_extra);
    }

    fn add_user_line(&self, user: &str, line: &str, extra: &str) {
        let mut f = fs::OpenOptions::new().append(true).open(self.passwd_path()).unwrap();
        writeln!(f, "{line}").unwrap();
        drop(f);
        if self.child.is_none() {
            return;
        }
        let want: Vec<String> = extra
            .split_whitespace()
            .filter_map(|kv| kv.strip_prefix("userdb_"))
            .map(|kv| kv.replace(R::USER_VAR, user).replacen('=', "\t", 1))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.doveadm(&["user", user]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && want.iter().all(|w| text.lines().any(|l| l == w)) {
                return;
            }
            if Instant::now() > deadline {
                self.command_failed(&format!("{} (waiting for {want:?})", self.doveadm_line(&["user", user])), &out);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `doveadm -c CONF ARGS...` (global options such as `-o k=v` or `-f tab` go first in ARGS; 2.4:
    /// `chroot ROOT doveadm`, paths in ARGS are chroot paths).
    pub fn doveadm(&self, args: &[&str]) -> Output {
        release_command::<R>(R::DOVEADM_BIN)
            .arg("-c")
            .arg(self.conf_in_root())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.doveadm_line(args)))
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

    /// `doveadm ARGS` with `-o K=V` for each of `overrides` first, via [`Self::doveadm_ok`].
    pub fn doveadm_with(&self, overrides: &[String], args: &[&str]) -> String {
        let mut all: Vec<&str> = Vec::new();
        for o in overrides {
            all.extend_from_slice(&["-o", o]);
        }
        all.extend_from_slice(args);
        self.doveadm_ok(&all)
    }

    fn doveadm_line(&self, args: &[&str]) -> String {
        self.command_line(R::DOVEADM_BIN, &[&["-c", &self.conf_in_root().display().to_string()], args].concat())
    }

    fn command_line(&self, prog: &str, args: &[&str]) -> String {
        let words = R::command_words(prog);
        let all: Vec<&str> = words[1..].iter().map(String::as_str).chain(args.iter().copied()).collect();
        shell_line(&words[0], &all)
    }

    /// Panic with everything useful about a failed command.
    pub fn command_failed(&self, cmdline: &str, out: &Output) -> ! {
        panic!(
            "command failed: {cmdline}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        )
    }

    /// An IMAP connection logged in as `user` (password [`PASSWORD`]).
    pub fn imap(&self, user: &str) -> Imap {
        let mut i = Imap::connect(self.port);
        i.login(user, PASSWORD);
        i
    }

    /// Deliver `message` with `dovecot-lda -c conf -d user [-m mailbox]` (mailboxes are autocreated).
    pub fn deliver(&self, user: &str, mailbox: Option<&str>, message: &[u8]) {
        let conf = self.conf_in_root().display().to_string();
        let mut args = vec!["-c", conf.as_str(), "-d", user];
        if let Some(m) = mailbox {
            args.extend_from_slice(&["-m", m]);
        }
        let mut child = release_command::<R>(R::LDA_BIN)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.command_line(R::LDA_BIN, &args)));
        let write_res = child.stdin.take().unwrap().write_all(message);
        let out = child.wait_with_output().unwrap();
        if !out.status.success() || write_res.is_err() {
            self.command_failed(&format!("{} < message ({write_res:?})", self.command_line(R::LDA_BIN, &args)), &out);
        }
    }

    /// `doveadm mailbox create -u user name`.
    pub fn create_mailbox(&self, user: &str, name: &str) {
        self.doveadm_ok(&["mailbox", "create", "-u", user, name]);
    }

    /// `(uid, flags)` of every message in `mailbox` as Dovecot sees it, sorted by uid; flags sorted and
    /// space separated, with the session flag `\Recent` removed.
    ///
    /// `location_override` has the **2.3 `mail_location` syntax with host paths** on either release, e.g.
    /// `maildir:BACKUP/Maildir:INDEX=MEMORY` or `…:LAYOUT=fs:INDEX=MEMORY`; a bare path means
    /// `maildir:PATH`. 2.3 gets `-o mail_location=…`; for 2.4 it is translated by
    /// `trixie::location_overrides` into 2.4 settings with chroot paths. Either way only what the override
    /// names is used: the instance's own layout/control/index settings are reset. With an override it reads
    /// another Maildir (e.g. a backup) as `user`: Dovecot then writes index and possibly uidlist files there
    /// as vmail — the tree must be vmail-writable (and, for 2.4, inside ROOT); append `:INDEX=MEMORY` to keep
    /// index files out of it. For raw settings use [`Self::fetch_uid_flags_with`].
    ///
    /// Careful: a mailbox that does not exist at the override location is not an error — `fetch ...
    /// mailbox X` is a search and simply returns no rows.
    pub fn fetch_uid_flags(&self, user: &str, mailbox: &str, location_override: Option<&str>) -> Vec<(u32, String)> {
        let ov = location_override.map(R::location_overrides).unwrap_or_default();
        self.fetch_uid_flags_with(user, mailbox, &ov)
    }

    /// [`Self::fetch_uid_flags`] with raw settings: each element `key=value` becomes `-o key=value` (values
    /// verbatim — for 2.4 chroot paths).
    pub fn fetch_uid_flags_with(&self, user: &str, mailbox: &str, overrides: &[String]) -> Vec<(u32, String)> {
        let out = self.doveadm_with(overrides, &["-f", "tab", "fetch", "-u", user, "uid flags", "mailbox", mailbox]);
        let mut rows = Vec::new();
        for (n, line) in out.lines().enumerate() {
            if (n == 0 && line.starts_with("uid")) || line.is_empty() {
                continue; // header
            }
            let (uid, flags) = line.split_once('\t').unwrap_or((line, ""));
            let uid: u32 = uid.trim().parse().unwrap_or_else(|_| panic!("bad doveadm fetch line {line:?} in:\n{out}"));
            rows.push((uid, normalize_flags(flags)));
        }
        rows.sort();
        rows
    }

    /// Last 80 lines of D/dovecot.log (plus D/dovecot.stderr if not empty), with a heading.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default();
        let err = fs::read_to_string(self.dir.join("dovecot.stderr")).unwrap_or_default();
        let mut s = format!("--- {} log tail ({}) ---\n{}", R::NAME, self.dir.join("dovecot.log").display(), tail_lines(&log, 80));
        if !err.trim().is_empty() {
            s.push_str(&format!("\n--- dovecot stderr ---\n{}", tail_lines(&err, 20)));
        }
        s
    }

    /// Panics (with the log tail) if dovecot.log is missing or has an `Error:`, `Panic:` or `Fatal:` line.
    pub fn assert_clean_log(&self) {
        let log = fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_else(|e| panic!("{}/dovecot.log: {e}", self.dir.display()));
        for bad in ["Error:", "Panic:", "Fatal:"] {
            assert!(!log.contains(bad), "{} log has {bad}\n{}", R::NAME, self.log_tail());
        }
    }

    /// Whether the master process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// Pids of this instance's processes: the master and its descendants (live ones only).
    pub fn processes(&self) -> Vec<u32> {
        let Some(pid) = self.master_pid else {
            return Vec::new();
        };
        let mut v: Vec<u32> = std::iter::once(pid).chain(descendants(pid)).filter(|&p| pid_alive(p)).collect();
        v.sort_unstable();
        v
    }

    /// Every pid this instance had that [`Self::stop`] saw (master + descendants at stop time). After
    /// `stop()` none of them should be alive.
    pub fn known_pids(&self) -> &[u32] {
        &self.kids
    }

    /// Stop this instance: SIGTERM to its master pid only (SIGKILL after 15 s), wait for it to exit and for
    /// its former children to disappear (SIGKILL to those left after 10 s). Idempotent; never panics.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = self.master_pid.take().unwrap_or(child.id());
        let kids = descendants(pid);
        self.kids = std::iter::once(pid).chain(kids.iter().copied()).collect();
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    eprintln!("{} master {pid} ({}) ignored SIGTERM; killing", R::NAME, self.dir.display());
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
                eprintln!("{} children {alive:?} of {pid} still alive; SIGKILL", R::NAME);
                for k in alive {
                    signal(k, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Instance<V23> {
    /// The 2.3 `mail_location` for `user`, expanded, e.g.
    /// `maildir:D/mail/alice/Maildir:CONTROL=D/control/alice:INDEX=D/index/alice:LAYOUT=fs`.
    pub fn mail_location(&self, user: &str) -> String {
        self.mail_settings(user).remove(0).1
    }
}

impl<R: Release> Drop for Instance<R> {
    fn drop(&mut self) {
        self.stop();
        if let Some(tmp) = self.tmp.take() {
            if std::env::var_os("MB_KEEP_TEST_DIRS").is_some() {
                #[allow(deprecated)]
                let p = tmp.into_path();
                eprintln!("MB_KEEP_TEST_DIRS: keeping {} test dir {}", R::NAME, p.display());
            }
        }
    }
}

/// `prog args...` as a shell command line, quoting args with characters outside the plain set.
fn shell_line(prog: &str, args: &[&str]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+{}".contains(c)) {
            s.push_str(a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        }
    }
    s
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
