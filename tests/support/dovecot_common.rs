//! What the Dovecot harness ([`super::dovecot`]) needs around it, the same for every release: the host (the
//! `vmail` user, chown, temporary directories, free ports, processes) and mail (messages with unique
//! Message-IDs, a fast bulk load over IMAP with known flags, flag normalization, a uidlist lock made the way
//! Dovecot makes it). (examples/demo.rs includes this file together with dovecot.rs and imap.rs.)

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::dovecot::{Instance, Release};
use super::imap::imap_quote;

// ---------------------------------------------------------------------------------------------------------
// The host

/// `(uid, gid)` of `name` in the passwd file `passwd` (`/etc/passwd`, or a root's).
pub fn passwd_ids(passwd: &Path, name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string(passwd).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// uid and gid of the host's `vmail` system user, creating it (once, race-tolerant) if missing.
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
        if let Some(ids) = passwd_ids(Path::new("/etc/passwd"), "vmail") {
            let _ = VMAIL.set(ids);
            return ids;
        }
        // Another process (a parallel test binary) may be running useradd at the same time: it then fails
        // with "already exists" (9) or cannot lock /etc/passwd; either way look again.
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", "vmail"])
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

/// chown a path and everything below it (no symlink following) to `(uid, gid)`.
pub fn chown_recursive(path: &Path, (uid, gid): (u32, u32)) {
    fn walk(p: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        if md.is_dir() {
            for e in fs::read_dir(p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
                walk(&e.unwrap().path(), uid, gid);
            }
        }
    }
    walk(path, uid, gid);
}

/// chown a path and everything below it (no symlink following) to the host's vmail:vmail.
pub fn chown_vmail_recursive(path: &Path) {
    chown_recursive(path, ensure_vmail());
}

/// A fresh temporary directory `base/prefixXXXXXX` (mode 0755, so vmail can traverse it), `base` created
/// if needed. Removed on drop.
pub fn tempdir_in(base: &Path, prefix: &str) -> tempfile::TempDir {
    fs::create_dir_all(base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
    let t = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap_or_else(|e| panic!("tempdir in {}: {e}", base.display()));
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// A fresh temporary directory (mode 0755) under `$MB_TEST_TMP` or `/tmp`.
pub fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("MB_TEST_TMP").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    tempdir_in(&base, "mbt.")
}

/// A free TCP port on 127.0.0.1 (bind to port 0, read it, drop). Never hands out the same port twice
/// within one test process. Another process may still grab it; `Dovecot::start` retries on EADDRINUSE.
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

/// Direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    process_parents().into_iter().filter(|&(_, pp)| pp == pid).map(|(c, _)| c).collect()
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
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
            state.as_deref() != Some("Z")
        }
        Err(_) => false,
    }
}

/// Live pids of all processes whose root directory is `root` (running chrooted in it).
pub fn processes_with_root(root: &Path) -> Vec<u32> {
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

/// kill(2) on a single, specific pid (never 0, 1 or negative).
pub fn signal(pid: u32, sig: libc::c_int) {
    if pid > 1 {
        // SAFETY: plain kill(2) on one pid.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Mail

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
pub fn populate<R: Release>(d: &Instance<R>, user: &str, folders: &[&str], per_folder: usize) {
    let mut imap = d.imap(user);
    for f in folders {
        if f.eq_ignore_ascii_case("INBOX") {
            continue;
        }
        if let Err(e) = imap.command(&format!("CREATE {}", imap_quote(f))) {
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

/// Expunges the given UIDs of `mailbox` over IMAP (to leave gaps that a backup must keep).
pub fn expunge<R: Release>(d: &Instance<R>, user: &str, mailbox: &str, uids: &str) {
    let mut imap = d.imap(user);
    imap.select(mailbox).unwrap();
    imap.uid_expunge(uids).unwrap();
    imap.logout();
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
