//! Helpers for `tests/plugin.rs` (real doveadm + our plugin): users with their own `userdb_mail`,
//! running the plugin (optionally from a given working directory), and reading a backup back through
//! Dovecot to compare it with its source.
//!
//! Self-contained on purpose (only `dovecot.rs` and `plugin.rs` of the harness are used), so changes to
//! other harness modules cannot break it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use maildir_backup::manifest::Manifest;

use super::dovecot::{chown_vmail_recursive, normalize_flags, tempdir, Dovecot, PASSWORD};
use super::plugin::{plugin_so, MODULE_DIR, PLUGIN_FILE};
use super::run::{cli_bin, Run};

// ---------------------------------------------------------------------------------------------------------
// Users

/// Appends `user:{PLAIN}secret::::::<extra>` to the instance's passwd file (`extra` is the 8th field, e.g.
/// `userdb_mail=maildir:/x/%u/Maildir:LAYOUT=fs`; may be empty) and waits until Dovecot's auth returns the
/// user (and, if `extra` sets `userdb_mail`, that mail location).
pub fn add_userdb_user(d: &Dovecot, user: &str, extra: &str) {
    let passwd = d.dir().join("passwd");
    let mut f = fs::OpenOptions::new().append(true).open(&passwd).unwrap();
    writeln!(f, "{user}:{{PLAIN}}{PASSWORD}::::::{extra}").unwrap();
    drop(f);
    let want_mail = extra
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("userdb_mail="))
        .map(|m| m.replace("%u", user));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.doveadm(&["user", user]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ok = out.status.success()
            && want_mail.as_ref().map_or(true, |m| text.lines().any(|l| l.starts_with("mail") && l.ends_with(m.as_str())));
        if ok {
            return;
        }
        if Instant::now() > deadline {
            d.command_failed(&format!("doveadm user {user} (waiting for the new passwd line)"), &out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A directory owned by vmail:vmail (mode 0755) at `path`, created with its parents.
pub fn vmail_dir(path: &Path) -> PathBuf {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    chown_vmail_recursive(path);
    path.to_path_buf()
}

/// A fresh temp dir that vmail can write (doveadm writes backups with vmail's privileges).
pub fn vmail_tempdir() -> tempfile::TempDir {
    let t = tempdir();
    chown_vmail_recursive(t.path());
    t
}

// ---------------------------------------------------------------------------------------------------------
// Running the plugin

/// A module dir holding just our plugin (once per test process).
fn module_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mb-plugin-users-mod-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create module dir");
        fs::copy(plugin_so(), dir.join(PLUGIN_FILE)).expect("copy plugin");
        dir
    })
    .clone()
}

/// `doveadm -c CONF ARGS...` with our plugin loaded (private mount namespace, module dir bind-mounted),
/// run in `cwd` (default: this process's cwd).
pub fn run_plugin_in(d: &Dovecot, cwd: Option<&Path>, args: &[&str]) -> Run {
    let script = format!("mount --bind \"$0\" {MODULE_DIR} && exec doveadm \"$@\"");
    let mut c = Command::new("unshare");
    c.args(["-m", "sh", "-c", &script]).arg(module_dir()).arg("-c").arg(d.conf()).args(args).stdin(Stdio::null());
    if let Some(dir) = cwd {
        c.current_dir(dir);
    }
    let started = Instant::now();
    let out: Output = c.output().expect("run unshare doveadm");
    Run::finish(format!("doveadm -c {} {}", d.conf().display(), args.join(" ")), started, out)
}

pub fn run_plugin(d: &Dovecot, args: &[&str]) -> Run {
    run_plugin_in(d, None, args)
}

/// A `-F` users file (one user per line) in `dir`.
pub fn users_file(dir: &Path, users: &[&str]) -> PathBuf {
    let p = dir.join(format!("users-{}", users.join("-")));
    fs::write(&p, users.iter().map(|u| format!("{u}\n")).collect::<String>()).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------------------
// Inspecting backups

pub fn read_manifest(backup: &Path) -> Manifest {
    maildir_backup::fsx::Dir::open(backup).map_err(|e| e.to_string()).and_then(|d| Manifest::read(&d).map_err(|e| e.to_string())).unwrap_or_else(|e| panic!("manifest of {}: {e}", backup.display()))
}

/// `maildir_backup::verify::verify`, panicking unless the backup is whole.
pub fn assert_verified(backup: &Path) -> maildir_backup::verify::VerifyReport {
    let v = maildir_backup::verify::verify(backup, 2).unwrap_or_else(|e| panic!("verify {}: {e}", backup.display()));
    assert!(v.is_whole(), "verify {}: {:#?}", backup.display(), v.problems);
    v
}

/// Files and directories below `root` (relative paths, sorted), with their permission bits.
pub fn tree_listing(root: &Path) -> BTreeMap<String, u32> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())).flatten() {
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = if md.is_dir() { "/" } else { "" };
            out.insert(format!("{rel}{kind}"), std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777);
            if md.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(root, root, &mut m);
    m
}

/// Message files (in `cur/`/`new/`) below `dir`: unique name → (relative path, size).
pub fn message_files(dir: &Path) -> BTreeMap<String, (String, u64)> {
    let mut m = BTreeMap::new();
    for (rel, _) in tree_listing(dir) {
        let p = Path::new(&rel);
        let parent = p.parent().and_then(|x| x.file_name()).and_then(|x| x.to_str());
        if rel.ends_with('/') || !matches!(parent, Some("cur") | Some("new")) {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let unique = name.split(':').next().unwrap().to_string();
        let size = fs::metadata(dir.join(&rel)).unwrap().len();
        m.insert(unique, (rel, size));
    }
    m
}

// ---------------------------------------------------------------------------------------------------------
// Reading through Dovecot

/// `mail_location` override that reads `backup` as a Maildir without writing index files into it.
pub fn backup_location(backup: &Path, layout_fs: bool) -> String {
    format!("maildir:{}:INDEX=MEMORY{}", backup.display(), if layout_fs { ":LAYOUT=fs" } else { "" })
}

fn doveadm_with(d: &Dovecot, location: Option<&str>, args: &[&str]) -> String {
    let ov = location.map(|l| format!("mail_location={l}"));
    let mut all: Vec<&str> = Vec::new();
    if let Some(o) = &ov {
        all.extend_from_slice(&["-o", o]);
    }
    all.extend_from_slice(args);
    d.doveadm_ok(&all)
}

/// Selectable mailboxes of `user` (as Dovecot names them) → their mail directory, optionally reading
/// another `mail_location`. Names without a Maildir (e.g. Maildir++ parents) are left out.
pub fn mailboxes(d: &Dovecot, user: &str, location: Option<&str>) -> BTreeMap<String, PathBuf> {
    let out = doveadm_with(d, location, &["-f", "tab", "mailbox", "list", "-u", user]);
    let mut m = BTreeMap::new();
    for (i, name) in out.lines().enumerate() {
        if (i == 0 && name == "mailbox") || name.is_empty() {
            continue;
        }
        let path = doveadm_with(d, location, &["mailbox", "path", "-u", user, "-t", "mailbox", name]);
        let path = PathBuf::from(path.trim_end_matches('\n'));
        if path.join("cur").is_dir() {
            m.insert(name.to_string(), path);
        }
    }
    m
}

/// One message as Dovecot lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Msg {
    pub uid: u32,
    /// For Maildir: the file's unique name (the part before `:`).
    pub guid: String,
    /// Sorted, `\Recent` removed.
    pub flags: String,
}

/// `doveadm [-o mail_location=..] -f tab fetch -u user 'uid guid flags' mailbox MAILBOX`, sorted by uid.
pub fn fetch(d: &Dovecot, user: &str, mailbox: &str, location: Option<&str>) -> Vec<Msg> {
    let out = doveadm_with(d, location, &["-f", "tab", "fetch", "-u", user, "uid guid flags", "mailbox", mailbox]);
    parse_uid_guid_flags(&out)
}

/// Rows of `doveadm -f tab fetch 'uid guid flags'` output, sorted by uid.
pub fn parse_uid_guid_flags(out: &str) -> Vec<Msg> {
    let mut v = Vec::new();
    for (i, line) in out.lines().enumerate() {
        if (i == 0 && line.starts_with("uid")) || line.is_empty() {
            continue;
        }
        let mut f = line.splitn(3, '\t');
        let uid = f.next().unwrap().trim().parse().unwrap_or_else(|_| panic!("bad fetch line {line:?}:\n{out}"));
        let guid = f.next().unwrap_or("").to_string();
        let flags = normalize_flags(f.next().unwrap_or(""));
        v.push(Msg { uid, guid, flags });
    }
    v.sort();
    v
}

/// `dovecot-keywords` of a folder: letter index → keyword.
fn keywords(folder_dir: &Path) -> BTreeMap<u32, String> {
    let text = fs::read_to_string(folder_dir.join("dovecot-keywords")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(i, k)| Some((i.parse().ok()?, k.to_string())))
        .collect()
}

/// IMAP flags for Maildir flag letters, normalized like [`fetch`].
pub fn letters_to_imap(letters: &str, kw: &BTreeMap<u32, String>) -> String {
    let v: Vec<String> = letters
        .chars()
        .filter_map(|c| match c {
            'S' => Some("\\Seen".to_string()),
            'R' => Some("\\Answered".to_string()),
            'F' => Some("\\Flagged".to_string()),
            'T' => Some("\\Deleted".to_string()),
            'D' => Some("\\Draft".to_string()),
            'a'..='z' => Some(kw.get(&(c as u32 - 'a' as u32)).cloned().unwrap_or_else(|| format!("<keyword {c}?>"))),
            _ => None,
        })
        .collect();
    normalize_flags(&v.join(" "))
}

/// What a folder's own files promise a reader: message files (unique name → IMAP flags), the uidlist's
/// uid → (unique name, GUID) for lines whose file exists (the GUID is the line's `G` extension if it has
/// one — Dovecot keeps a message's GUID across COPY/MOVE — else the unique name), and the first uid a
/// reader may give files the uidlist does not list.
#[derive(Debug, Clone)]
pub struct FolderView {
    pub files: BTreeMap<String, String>,
    pub listed: BTreeMap<u32, (String, String)>,
    pub next_uid: u32,
}

pub fn folder_view(folder_dir: &Path) -> FolderView {
    let kw = keywords(folder_dir);
    let mut files = BTreeMap::new();
    for sub in ["cur", "new"] {
        for e in fs::read_dir(folder_dir.join(sub)).unwrap_or_else(|e| panic!("{}/{sub}: {e}", folder_dir.display())).flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let (unique, letters) = match name.split_once(':') {
                Some((u, info)) => (u.to_string(), info.strip_prefix("2,").unwrap_or("").to_string()),
                None => (name.clone(), String::new()),
            };
            assert!(files.insert(unique.clone(), letters_to_imap(&letters, &kw)).is_none(), "{}: two files for {unique}", folder_dir.display());
        }
    }
    let mut listed = BTreeMap::new();
    let mut next_uid = 1;
    if let Ok(text) = fs::read_to_string(folder_dir.join("dovecot-uidlist")) {
        let mut lines = text.lines();
        for f in lines.next().unwrap_or("").split(' ') {
            if let Some(n) = f.strip_prefix('N') {
                next_uid = n.parse().unwrap_or(1);
            }
        }
        for l in lines {
            let Some((left, name)) = l.split_once(" :") else { continue };
            let mut fields = left.split(' ');
            let Ok(uid) = fields.next().unwrap_or("").parse::<u32>() else { continue };
            next_uid = next_uid.max(uid + 1);
            let unique = name.split(':').next().unwrap_or(name).to_string();
            let guid = fields.find_map(|f| f.strip_prefix('G')).map(str::to_string).unwrap_or_else(|| unique.clone());
            if files.contains_key(&unique) {
                listed.insert(uid, (unique, guid));
            }
        }
    }
    FolderView { files, listed, next_uid }
}

/// Compares what Dovecot lists for a folder with [`folder_view`] of its files (taken before Dovecot
/// opened it): every file exactly once, listed ones under their uidlist uid and GUID, unlisted ones with
/// new uids, flags from the file names. Returns the differences (empty: consistent).
pub fn compare_view(view: &FolderView, got: &[Msg]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: HashMap<String, u32> = HashMap::new();
    for m in got {
        // Which file Dovecot means: the uidlist's for listed uids, the GUID (= file name) otherwise.
        let unique = match view.listed.get(&m.uid) {
            Some((unique, guid)) => {
                if *guid != m.guid {
                    problems.push(format!("uid {}: uidlist says GUID {guid} ({unique}), Dovecot says {}", m.uid, m.guid));
                }
                unique.clone()
            }
            None => {
                if m.uid < view.next_uid {
                    problems.push(format!("uid {} {}: below next uid {} but not in the uidlist", m.uid, m.guid, view.next_uid));
                }
                if view.listed.values().any(|(u, _)| *u == m.guid) {
                    problems.push(format!("uid {} {}: the uidlist gives this file another uid", m.uid, m.guid));
                }
                m.guid.clone()
            }
        };
        if let Some(prev) = seen.insert(unique.clone(), m.uid) {
            problems.push(format!("{unique} listed twice (uids {prev} and {})", m.uid));
        }
        match view.files.get(&unique) {
            None => problems.push(format!("uid {} {unique}: Dovecot lists it, there is no such file", m.uid)),
            Some(f) if *f != m.flags => problems.push(format!("uid {} {unique}: file says {f:?}, Dovecot says {:?}", m.uid, m.flags)),
            Some(_) => {}
        }
    }
    for u in view.files.keys() {
        if !seen.contains_key(u) {
            problems.push(format!("file {u}: Dovecot does not list it"));
        }
    }
    problems.truncate(20);
    problems
}

/// Dovecot (as `reader`) reads `backup`: for every folder in its manifest, uids and flags agree with the
/// backup's uidlist and file names, and Dovecot finds exactly the manifest's folders. Returns problems.
pub fn check_dovecot_reads_backup(d: &Dovecot, reader: &str, backup: &Path, layout_fs: bool) -> Vec<String> {
    let manifest = read_manifest(backup);
    let want: BTreeSet<PathBuf> = manifest.folders.iter().map(|f| backup.join(&f.path)).collect();
    // Views first: Dovecot may write to the folders it opens.
    let views: BTreeMap<PathBuf, FolderView> = want.iter().map(|p| (p.clone(), folder_view(p))).collect();
    let loc = backup_location(backup, layout_fs);
    let boxes = mailboxes(d, reader, Some(&loc));
    let mut problems = Vec::new();
    let found: BTreeSet<PathBuf> = boxes.values().map(|p| PathBuf::from(p.to_string_lossy().trim_end_matches('/'))).collect();
    let want_norm: BTreeSet<PathBuf> = want.iter().map(|p| PathBuf::from(p.to_string_lossy().trim_end_matches('/'))).collect();
    if found != want_norm {
        problems.push(format!("{}: Dovecot sees folders {found:?}, the manifest has {want_norm:?}", backup.display()));
    }
    for (name, path) in &boxes {
        let key = want.iter().find(|p| p.to_string_lossy().trim_end_matches('/') == path.to_string_lossy().trim_end_matches('/'));
        let Some(view) = key.and_then(|k| views.get(k)) else { continue };
        let got = fetch(d, reader, name, Some(&loc));
        for p in compare_view(view, &got) {
            problems.push(format!("{} mailbox {name}: {p}", backup.display()));
        }
    }
    problems
}

/// Source (`user`'s own mail) and `backup` read through Dovecot: same mailboxes, and in each the same
/// (uid, guid, flags). Returns problems.
pub fn compare_source_and_backup(d: &Dovecot, user: &str, reader: &str, backup: &Path, layout_fs: bool) -> Vec<String> {
    let loc = backup_location(backup, layout_fs);
    let src = mailboxes(d, user, None);
    let bak = mailboxes(d, reader, Some(&loc));
    let mut problems = Vec::new();
    let (sn, bn): (BTreeSet<&String>, BTreeSet<&String>) = (src.keys().collect(), bak.keys().collect());
    if sn != bn {
        problems.push(format!("{user}: source mailboxes {sn:?}, backup {bn:?}"));
    }
    for name in sn.intersection(&bn) {
        let a = fetch(d, user, name, None);
        let b = fetch(d, reader, name, Some(&loc));
        if a != b {
            let only_a: Vec<&Msg> = a.iter().filter(|m| !b.contains(m)).take(5).collect();
            let only_b: Vec<&Msg> = b.iter().filter(|m| !a.contains(m)).take(5).collect();
            problems.push(format!(
                "{user} mailbox {name}: {} messages in the source, {} in the backup; only in source {only_a:?}; only in backup {only_b:?}",
                a.len(),
                b.len()
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------------------
// Holding a uidlist lock from outside

/// `maildir-backup lock CONTROL_DIR -- sleep SECS` (our CLI, Dovecot's lock format). Stopped on drop.
pub struct LockHolder {
    child: Option<Child>,
    pub lock_path: PathBuf,
}

impl LockHolder {
    /// Starts the holder and waits until the lock file exists.
    pub fn start(control_dir: &Path, secs: u32) -> LockHolder {
        let lock_path = control_dir.join("dovecot-uidlist.lock");
        assert!(!lock_path.exists(), "{} already exists", lock_path.display());
        let child = Command::new(cli_bin())
            .arg("lock")
            .arg(control_dir)
            .arg("--")
            .args(["sleep", &secs.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("run maildir-backup lock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock_path.exists() {
            assert!(Instant::now() < deadline, "{} did not appear", lock_path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        LockHolder { child: Some(child), lock_path }
    }

    /// SIGTERM to the holder (it forwards it to `sleep` and releases the lock), then wait.
    pub fn release(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let Some(mut c) = self.child.take() else { return };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // `maildir-backup lock` forwards SIGTERM to its command, but (as of writing) starts the command
        // with SIGTERM blocked, so `sleep` ignores it until it ends by itself. End our own `sleep` (a
        // child of the holder we started) so the holder releases the lock now.
        let kids = children_of(c.id());
        eprintln!("note: `maildir-backup lock` did not end within 2 s of SIGTERM; SIGKILL to its command {kids:?}");
        for k in kids {
            let _ = kill(Pid::from_raw(k as i32), Signal::SIGKILL);
        }
        let _ = c.wait();
    }
}

/// Direct children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if rest.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
            v.push(p);
        }
    }
    v
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        self.stop();
    }
}
