//! A private, real Dovecot 2.3 instance for integration tests.
//!
//! Each [`Dovecot`] owns a fresh directory `D` (see [`tempdir`]) and a free port `P` on 127.0.0.1, and reads
//! nothing from `/etc/dovecot`: every `dovecot`, `doveadm` and `dovecot-lda` call gets `-c D/dovecot.conf`.
//!
//! Layout of `D`:
//! - `dovecot.conf`, `passwd` (passwd-file for passdb and userdb; every user's password is [`PASSWORD`])
//! - `run/` (base_dir, `run/master.pid`), `state/` (state_dir), `dovecot.log` (all logging), `dovecot.stderr`
//! - `mail/<user>/Maildir` — the mail root (`mail_location = maildir:D/mail/%u/Maildir`)
//! - with `control: true`: `control/<user>` and `index/<user>` (`:CONTROL=D/control/%u:INDEX=D/index/%u`)
//!
//! Namespace: a single `inbox` namespace (`inbox = yes`, no prefix). Hierarchy separator is `.` for the
//! default Maildir++ layout (folder `Archive.2024` lives in `Maildir/.Archive.2024/`) and `/` for
//! `layout_fs` (folder `Archive/2024` lives in `Maildir/Archive/2024/`). See [`Dovecot::separator`].
//!
//! Mail processes run as the `vmail` system user (Dovecot refuses uid 0 for mail access), so everything a
//! Dovecot process must write — the mail root, a backup that Dovecot should read — must be owned by vmail
//! ([`chown_vmail_recursive`]).

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::dovecot_common::{
    append_passwd, child_running, command_failed, conf_tail, create_mail_dirs, descendants,
    keep_or_remove, log_tail, shell_line, stop_master, wait_for_user, write_passwd, STATS_SERVICE,
};
pub use super::dovecot_common::normalize_flags;
use super::imap::Imap;

/// Password of every user in the instance's passwd file.
pub const PASSWORD: &str = "secret";
/// Dovecot's local delivery agent (Debian path).
pub const LDA_BIN: &str = "/usr/lib/dovecot/dovecot-lda";
const DOVECOT_BIN: &str = "dovecot";
const DOVEADM_BIN: &str = "doveadm";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How to configure a [`Dovecot`] instance.
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// Split control and index files out of the Maildir: `:CONTROL=D/control/%u:INDEX=D/index/%u`.
    pub control: bool,
    /// `:LAYOUT=fs` (folders as nested directories, separator `/`) instead of Maildir++ (separator `.`).
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
        }
    }
}

/// A running private Dovecot. Stopped (only this instance's master pid) and its directory removed on drop
/// (kept and printed when `MB_KEEP_TEST_DIRS` is set).
pub struct Dovecot {
    tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    port: u16,
    opts: DovecotOptions,
    conf: PathBuf,
    instance: String,
    child: Option<Child>,
    master_pid: Option<u32>,
}

// ---------------------------------------------------------------------------------------------------------
// Free helpers

/// uid and gid of the `vmail` system user, creating it (once, race-tolerant) if missing.
pub fn ensure_vmail() -> (u32, u32) {
    static VMAIL: OnceLock<(u32, u32)> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    if let Some(ids) = VMAIL.get() {
        return *ids;
    }
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ids) = VMAIL.get() {
        return *ids;
    }
    let mut last = String::new();
    for _ in 0..40 {
        if let Some(ids) = lookup_passwd("vmail") {
            let _ = VMAIL.set(ids);
            return ids;
        }
        // Another process (a parallel test binary) may be running useradd at the same time: it then fails
        // with "already exists" (9) or cannot lock /etc/passwd; either way look again.
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                "vmail",
            ])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => {
                last = format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr));
                if o.status.success() {
                    continue;
                }
            }
            Err(e) => last = format!("cannot run useradd: {e}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("could not create or find the vmail user: {last}");
}

fn lookup_passwd(name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// chown a path and everything below it (no symlink following) to vmail:vmail.
pub fn chown_vmail_recursive(path: &Path) {
    let (uid, gid) = ensure_vmail();
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

/// A free TCP port on 127.0.0.1 (bind to port 0, read it, drop). Never hands out the same port twice
/// within one test process. Another process may still grab it; [`Dovecot::start`] retries on EADDRINUSE.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let set = given.get_or_insert_with(HashSet::new);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if set.insert(port) {
            return port;
        }
    }
}

/// After spawning a Dovecot master (`child`, pid `master_pid`): waits until 127.0.0.1:`port` greets with
/// `* OK` (then logs out), up to READY_TIMEOUT; clears both if the master exits first. Then warns if
/// `dir`/run/master.pid names another pid. Shared by the 2.3 ([`Dovecot`]) and 2.4 (`Dovecot24`) harnesses.
pub(super) fn wait_until_serving(
    child: &mut Option<Child>,
    master_pid: &mut Option<u32>,
    port: u16,
    dir: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    loop {
        if let Some(st) = child.as_mut().unwrap().try_wait().unwrap() {
            *child = None;
            *master_pid = None;
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
            return Err(format!(
                "127.0.0.1:{} did not answer `* OK` within {READY_TIMEOUT:?}",
                port
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // With -F the master is our child (2.4: chroot(8) execs it); master.pid should hold the same pid.
    let pidfile = dir.join("run/master.pid");
    if let Some(pid) = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        if Some(pid) != *master_pid {
            eprintln!(
                "warning: {} says {pid}, spawned {:?}",
                pidfile.display(),
                master_pid
            );
        }
    }
    Ok(())
}

/// A fresh temporary directory (mode 0755, so vmail can traverse it) under `$MB_TEST_TMP` or `/tmp`.
pub fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("MB_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    fs::create_dir_all(&base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
    let t = tempfile::Builder::new()
        .prefix("mbt.")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("tempdir in {}: {e}", base.display()));
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// An RFC 5322 message, CRLF line ends, `Subject: msg <i>`, a Message-ID unique across all calls (and
/// processes), body padded with text lines to roughly `size_hint` bytes in total.
pub fn message(i: usize, size_hint: usize) -> Vec<u8> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut m = format!(
        "From: Sender <sender@example.com>\r\n\
         To: Alice <alice@example.com>\r\n\
         Subject: msg {i}\r\n\
         Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n\
         Message-ID: <{i}.{seq}.{pid}.{nanos}@test.example>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is message {i}.\r\n",
        pid = std::process::id()
    );
    let mut n = 0usize;
    while m.len() < size_hint {
        let mut line = format!("line {n} of message {i}: ");
        while line.len() < 74 {
            line.push((b'a' + ((i + n + line.len()) % 26) as u8) as char);
        }
        line.push_str("\r\n");
        m.push_str(&line);
        n += 1;
    }
    m.into_bytes()
}

/// The IMAP flags [`populate`] gives to the `j`-th message (0-based) of a folder: `\Seen` on even j,
/// `\Flagged` on every 7th, `\Answered` on every 5th, keyword `$Work` on every 11th. May be "".
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.75
pub fn populate_flags(j: usize) -> String {
    let mut f = Vec::new();
    if j % 2 == 0 {
        f.push("\\Seen");
    }
    if j % 5 == 0 {
        f.push("\\Answered");
    }
    if j % 7 == 0 {
        f.push("\\Flagged");
    }
    if j % 11 == 0 {
        f.push("$Work");
    }
    f.join(" ")
}

/// Fast bulk load over one IMAP connection: creates the folders (`INBOX` and existing ones are fine), then
/// appends `per_folder` messages to each with MULTIAPPEND + LITERAL+ in batches. Message `j` of folder
/// number `k` is `message(k * per_folder + j, ..)` (sizes vary between ~0.5 and ~3.5 kB) with flags
/// [`populate_flags`]`(j)`. UIDs in each folder are therefore 1..=per_folder when the folder was empty.
pub fn populate(d: &Dovecot, user: &str, folders: &[&str], per_folder: usize) {
    let mut imap = d.imap(user);
    for f in folders {
        if f.eq_ignore_ascii_case("INBOX") {
            continue;
        }
        if let Err(e) = imap.command(&format!("CREATE {}", super::imap::imap_quote(f))) {
            if !e.contains("ALREADYEXISTS") {
                panic!("populate: CREATE {f} failed: {e}\n{}", d.log_tail());
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
        imap.append_many(f, &refs)
            .unwrap_or_else(|e| panic!("populate: APPEND to {f} failed: {e}\n{}", d.log_tail()));
    }
    imap.logout();
}

/// A `dovecot-uidlist.lock` made the way Dovecot makes it (O_EXCL, content `<live pid>:<hostname>`,
/// here the test process's pid), so Dovecot treats it as held: syncs (SELECT etc.) wait for it. Note that
/// `/usr/lib/dovecot/maildirlock` is broken in 2.3.19.1 and cannot be used for this. Removed on drop.
pub struct FakeLock {
    path: PathBuf,
    released: bool,
}

impl FakeLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn release(mut self) {
        self.do_release();
    }
    fn do_release(&mut self) {
        if !self.released {
            self.released = true;
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for FakeLock {
    fn drop(&mut self) {
        self.do_release();
    }
}

/// Take a [`FakeLock`] on `control_dir/dovecot-uidlist.lock` (`control_dir` as printed by
/// `Dovecot::mailbox_path(user, mailbox, "control")`). Panics if the lock already exists.
pub fn fake_uidlist_lock(control_dir: &Path) -> FakeLock {
    let path = control_dir.join("dovecot-uidlist.lock");
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    write!(f, "{}:{}", std::process::id(), host.trim()).unwrap();
    FakeLock {
        path,
        released: false,
    }
}


// ---------------------------------------------------------------------------------------------------------

impl Dovecot {
    /// Configure and start a new instance; returns once 127.0.0.1:port answers `* OK`.
    /// Panics (with the log tail) on failure.
    pub fn start(opts: DovecotOptions) -> Dovecot {
        static N: AtomicUsize = AtomicUsize::new(0);
        let (vuid, vgid) = ensure_vmail();
        let tmp = tempdir();
        let dir = tmp.path().to_path_buf();
        create_mail_dirs(&dir, opts.control, vuid, vgid);
        let instance = format!(
            "mbt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let conf = dir.join("dovecot.conf");
        let mut d = Dovecot {
            tmp: Some(tmp),
            dir,
            port: 0,
            opts,
            conf,
            instance,
            child: None,
            master_pid: None,
        };
        write_passwd(&d.passwd_path(), &d.opts.users);

        for attempt in 0.. {
            d.port = free_port();
            fs::write(d.conf(), d.render_conf()).unwrap();
            match d.spawn_and_wait() {
                Ok(()) => return d,
                Err(_) if d.log_tail().contains("Address already in use") && attempt < 5 => {
                    d.stop();
                    eprintln!("dovecot test instance: port {} taken, retrying", d.port);
                    continue;
                }
                Err(msg) => {
                    d.stop();
                    panic!(
                        "starting dovecot in {} failed: {msg}\n{}",
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

    fn render_conf(&self) -> String {
        let d = self.dir.display();
        let o = &self.opts;
        let sep = self.separator();
        format!(
            r#"# maildir-backup test instance (generated by tests/support/dovecot.rs)
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
debug_log_path = {d}/dovecot.log
instance_name = {inst}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{stats}
passdb {{
  driver = passwd-file
  args = {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}

mail_uid = vmail
mail_gid = vmail
first_valid_uid = 1
first_valid_gid = 1
mail_location = {loc}
{tail}"#,
            inst = self.instance,
            port = self.port,
            loc = self.mail_location("%u"),
            stats = STATS_SERVICE,
            tail = conf_tail(o.nfs, o.excl, sep, &o.extra_conf),
        )
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        // Fresh log files per attempt, so a retry decision only sees this attempt's errors.
        let _ = fs::remove_file(self.dir.join("dovecot.log"));
        let errf = fs::File::create(self.dir.join("dovecot.stderr")).unwrap();
        let child = Command::new(DOVECOT_BIN)
            .arg("-F")
            .arg("-c")
            .arg(self.conf())
            .stdin(Stdio::null())
            .stdout(errf.try_clone().unwrap())
            .stderr(errf)
            .spawn()
            .map_err(|e| format!("cannot run {DOVECOT_BIN}: {e}"))?;
        self.master_pid = Some(child.id());
        self.child = Some(child);
        wait_until_serving(&mut self.child, &mut self.master_pid, self.port, &self.dir)
    }

    /// The instance directory D.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// D/dovecot.conf
    pub fn conf(&self) -> &Path {
        &self.conf
    }
    pub fn options(&self) -> &DovecotOptions {
        &self.opts
    }
    /// This instance's `instance_name`.
    pub fn instance_name(&self) -> &str {
        &self.instance
    }
    /// The master's pid while running.
    pub fn master_pid(&self) -> Option<u32> {
        self.master_pid
    }
    /// Hierarchy separator of the inbox namespace: `.` (Maildir++) or `/` (LAYOUT=fs).
    pub fn separator(&self) -> char {
        if self.opts.layout_fs {
            '/'
        } else {
            '.'
        }
    }

    /// The 2.3 `mail_location` for `user`, expanded, e.g.
    /// `maildir:D/mail/alice/Maildir:CONTROL=D/control/alice:INDEX=D/index/alice:LAYOUT=fs`.
    pub fn mail_location(&self, user: &str) -> String {
        let d = self.dir.display();
        let mut s = format!("maildir:{d}/mail/{user}/Maildir");
        if self.opts.control {
            s.push_str(&format!(
                ":CONTROL={d}/control/{user}:INDEX={d}/index/{user}"
            ));
        }
        if self.opts.layout_fs {
            s.push_str(":LAYOUT=fs");
        }
        s
    }

    /// Root Maildir of `user` (D/mail/user/Maildir); created by Dovecot on first access.
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.join("mail").join(user).join("Maildir")
    }

    /// CONTROL= root of `user` (D/control/user) — only meaningful with `control: true`.
    pub fn control_root(&self, user: &str) -> PathBuf {
        self.dir.join("control").join(user)
    }

    /// INDEX= root of `user` (D/index/user) — only meaningful with `control: true`.
    pub fn index_root(&self, user: &str) -> PathBuf {
        self.dir.join("index").join(user)
    }

    /// `doveadm mailbox path -u USER -t KIND MAILBOX`; kind is "mailbox", "control" or "index".
    /// (Dovecot prints the path whether or not the mailbox exists.)
    pub fn mailbox_path(&self, user: &str, mailbox: &str, kind: &str) -> PathBuf {
        let out = self.doveadm_ok(&["mailbox", "path", "-u", user, "-t", kind, mailbox]);
        PathBuf::from(out.trim_end_matches('\n'))
    }

    /// Append a user (password [`PASSWORD`]) to the passwd file and wait until Dovecot's auth sees it.
    /// (passwd-file is re-read without a reload, but auth checks the file at most once per second, so a
    /// lookup right after the append can still say "unknown user".)
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

    /// Run `doveadm -c D/dovecot.conf ARGS...` (global options such as `-o k=v` or `-f tab` go first in ARGS).
    pub fn doveadm(&self, args: &[&str]) -> Output {
        Command::new(DOVEADM_BIN)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {DOVEADM_BIN}: {e}"))
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
        let conf = self.conf();
        let mut all = vec!["-c", conf.to_str().unwrap()];
        all.extend_from_slice(args);
        shell_line(DOVEADM_BIN, &all, "")
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

    /// Deliver `message` with `dovecot-lda -c conf -d user [-m mailbox]` (mailboxes are autocreated).
    pub fn deliver(&self, user: &str, mailbox: Option<&str>, message: &[u8]) {
        let conf = self.conf();
        let mut args = vec!["-c", conf.to_str().unwrap(), "-d", user];
        if let Some(m) = mailbox {
            args.extend_from_slice(&["-m", m]);
        }
        let mut child = Command::new(LDA_BIN)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {LDA_BIN}: {e}"));
        let write_res = child.stdin.take().unwrap().write_all(message);
        let out = child.wait_with_output().unwrap();
        if !out.status.success() || write_res.is_err() {
            self.command_failed(
                &format!("{} < message ({write_res:?})", shell_line(LDA_BIN, &args, "")),
                &out,
            );
        }
    }

    /// `doveadm mailbox create -u user name`.
    pub fn create_mailbox(&self, user: &str, name: &str) {
        self.doveadm_ok(&["mailbox", "create", "-u", user, name]);
    }

    /// `(uid, flags)` of every message in `mailbox` as Dovecot sees it, sorted by uid; flags sorted and
    /// space separated, with the session flag `\Recent` removed. Runs
    /// `doveadm [-o mail_location=OVERRIDE] -f tab fetch -u user 'uid flags' mailbox MAILBOX`, so with an
    /// override it reads another Maildir (e.g. a backup) as `user`. Note: Dovecot then writes index and
    /// possibly uidlist files there as vmail — the tree must be vmail-writable ([`chown_vmail_recursive`]);
    /// append `:INDEX=MEMORY` to the override to keep index files out of it.
    pub fn fetch_uid_flags(
        &self,
        user: &str,
        mailbox: &str,
        mail_location_override: Option<&str>,
    ) -> Vec<(u32, String)> {
        let ov: Vec<String> = mail_location_override
            .map(|l| format!("mail_location={l}"))
            .into_iter()
            .collect();
        super::dovecot_common::fetch_uid_flags(|a| self.doveadm_ok(a), user, mailbox, &ov)
    }

    /// Last 80 lines of D/dovecot.log (plus D/dovecot.stderr if not empty), with a heading.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir, "dovecot")
    }

    /// Whether the master process is still running.
    pub fn is_running(&mut self) -> bool {
        child_running(self.child.as_mut())
    }

    /// Stop this instance: SIGTERM to its master pid only (SIGKILL after 15 s), wait for the master to exit
    /// and for its former child processes to disappear. Idempotent; never panics.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        let pid = self.master_pid.take().unwrap_or(child.id());
        let kids = descendants(pid);
        stop_master(child, pid, &kids, "dovecot", &self.dir);
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        keep_or_remove(self.tmp.take(), "dovecot");
    }
}
