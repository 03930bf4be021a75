//! Helpers for the repository (`backup --repo`, `snapshots`, `prune`, `verify`) and `restore` tests:
//! running the CLI, reading a manifest independently of the crate (plain `serde_json`), hard-link facts,
//! full listings of a tree (to prove a target was not touched), byte flipping, IMAP views by Message-ID.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::churn::message_id_in;
use super::dovecot::{Dovecot, DovecotOptions};
use super::dovecot_common::normalize_flags;
use super::imap::{mutf7_encode, Imap};
use super::run::{cli, cli_env, Run};
use std::process::Command;

/// A Dovecot with `users` (and room for many IMAP sessions per user).
pub fn start_with_users(users: &[&str]) -> Dovecot {
    Dovecot::start(DovecotOptions {
        users: users.iter().map(|s| s.to_string()).collect(),
        extra_conf: "mail_max_userip_connections = 50\n".into(),
        ..Default::default()
    })
}

/// `backup --json --repo REPO --name NAME [EXTRA...] SOURCE`; returns (snapshot dir, JSON report).
pub fn take_snapshot(source: &str, repo: &Path, name: &str, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    take_snapshot_env(source, repo, name, extra, &[])
}

/// [`take_snapshot`] with extra environment variables for the CLI.
pub fn take_snapshot_env(source: &str, repo: &Path, name: &str, extra: &[&str], env: &[(&str, &OsStr)]) -> (PathBuf, serde_json::Value) {
    let mut args: Vec<String> = vec!["backup".into(), "--json".into(), "--repo".into(), repo.display().to_string(), "--name".into(), name.into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(source.to_string());
    let r = cli_env(&args, env);
    assert_eq!(r.code(), Some(0), "command failed:\n{}", r.show());
    let json = r.json();
    let dest = PathBuf::from(json["destination"].as_str().unwrap_or_else(|| panic!("no destination:\n{}", r.show())));
    assert!(dest.join("maildir-backup.manifest").is_file(), "{} has no manifest", dest.display());
    (dest, json)
}

/// `verify DIR` → the run (exit 0 = whole).
pub fn verify(dir: &Path) -> Run {
    cli(&[OsStr::new("verify"), dir.as_os_str()])
}

pub fn assert_verifies(dir: &Path) {
    let r = verify(dir);
    assert_eq!(r.code(), Some(0), "verify of {} failed:\n{}", dir.display(), r.show());
}

/// One message record of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestMsg {
    pub folder: String,
    pub dir: String,
    pub name: String,
    pub unique: String,
    pub flags: String,
    pub size: u64,
    pub blake3: String,
}

impl ManifestMsg {
    /// The message file inside `snapshot`.
    pub fn path_in(&self, snapshot: &Path) -> PathBuf {
        snapshot.join(&self.folder).join(&self.dir).join(&self.name)
    }
}

/// A manifest read line by line with plain serde_json.
#[derive(Debug, Clone)]
pub struct ManifestData {
    pub header: serde_json::Value,
    pub folders: Vec<serde_json::Value>,
    pub messages: Vec<ManifestMsg>,
}

/// The JSON lines of a snapshot's manifest (written zstd-compressed; plain ones are read as they are).
pub fn manifest_text(snapshot: &Path) -> String {
    lines_of(&snapshot.join("maildir-backup.manifest"))
}

/// A file of JSON lines, zstd-compressed or plain.
fn lines_of(p: &Path) -> String {
    let raw = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let plain = if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) { zstd::decode_all(&raw[..]).unwrap_or_else(|e| panic!("decompress {}: {e}", p.display())) } else { raw };
    String::from_utf8(plain).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A snapshot's manifest, with the message records of its stored folders (in the series'
/// `.store/<id>/messages`).
pub fn read_manifest(snapshot: &Path) -> ManifestData {
    let p = snapshot.join("maildir-backup.manifest");
    let mut header = serde_json::Value::Null;
    let (mut folders, mut messages) = (Vec::new(), Vec::new());
    for line in lines_of(&p).lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: bad line {line:?}: {e}", p.display()));
        match v["kind"].as_str() {
            Some("backup") => header = v,
            Some("folder") => {
                if let Some(id) = v["store"].as_str() {
                    messages.extend(stored_records(&snapshot.join("..").join(".store"), id));
                }
                folders.push(v)
            }
            Some("message") => messages.push(message_of(&v)),
            other => panic!("{}: unknown record kind {other:?}", p.display()),
        }
    }
    assert!(!header.is_null(), "{}: no header record", p.display());
    ManifestData { header, folders, messages }
}

fn message_of(v: &serde_json::Value) -> ManifestMsg {
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}")).to_string();
    ManifestMsg { folder: s("folder"), dir: s("dir"), name: s("name"), unique: s("unique"), flags: s("flags"), size: v["size"].as_u64().unwrap(), blake3: s("blake3") }
}

/// The message records of store entry `id`: its own, or, if it names a base, the base's with
/// its changes (renamed, gone, new) applied.
pub fn stored_records(store: &Path, id: &str) -> Vec<ManifestMsg> {
    let file = store.join(id).join("messages");
    let lines: Vec<serde_json::Value> = lines_of(&file).lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let Some(base) = lines.first().filter(|v| v["kind"] == "base") else { return lines.iter().map(message_of).collect() };
    let mut records = stored_records(store, base["store"].as_str().unwrap());
    for v in &lines[1..] {
        match v["kind"].as_str() {
            Some("message") => records.push(message_of(v)),
            Some("gone") => records.retain(|m| m.unique != v["unique"].as_str().unwrap()),
            Some("renamed") => {
                let name = v["name"].as_str().unwrap();
                let (unique, flags) = name.split_once(":2,").unwrap_or((name, ""));
                let m = records.iter_mut().find(|m| m.unique == unique).unwrap_or_else(|| panic!("{}: {name} renamed, not in its base", file.display()));
                (m.dir, m.name, m.flags) = (v["dir"].as_str().unwrap().to_string(), name.to_string(), flags.to_string());
            }
            other => panic!("{}: unknown record kind {other:?}", file.display()),
        }
    }
    records
}

/// The base entry store entry `id`'s records are written against, if any.
pub fn stored_base(store: &Path, id: &str) -> Option<String> {
    let text = lines_of(&store.join(id).join("messages"));
    let first: serde_json::Value = serde_json::from_str(text.lines().next()?).unwrap();
    (first["kind"] == "base").then(|| first["store"].as_str().unwrap().to_string())
}

/// The entries `linked` and every base their records are written against: what a prune keeps.
pub fn with_bases(store: &Path, mut linked: Vec<String>) -> std::collections::BTreeSet<String> {
    let mut needed = std::collections::BTreeSet::new();
    while let Some(id) = linked.pop() {
        if needed.insert(id.clone()) {
            linked.extend(stored_base(store, &id));
        }
    }
    needed
}

/// The Maildir++ directory of IMAP folder `name` below a Maildir root (or a snapshot).
pub fn folder_dir(root: &Path, name: &str) -> PathBuf {
    if name.eq_ignore_ascii_case("INBOX") {
        root.to_path_buf()
    } else {
        root.join(format!(".{}", mutf7_encode(name)))
    }
}

pub fn nlink(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).nlink()
}

/// (dev, inode) of a file.
pub fn inode(p: &Path) -> (u64, u64) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (md.dev(), md.ino())
}

/// Every regular file directly in a `cur/` or `new/` directory below `root`.
pub fn message_files(root: &Path) -> Vec<PathBuf> {
    super::churn::all_files(root)
        .into_iter()
        .filter(|f| {
            let parent = f.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str());
            matches!(parent, Some("cur") | Some("new")) && fs::symlink_metadata(f).map(|m| m.is_file()).unwrap_or(false)
        })
        .collect()
}

/// The unique part of a Maildir file name (before `:`).
pub fn unique_of(path: &Path) -> String {
    let n = path.file_name().unwrap().to_string_lossy();
    n.split(':').next().unwrap().to_string()
}

pub fn blake3_of(p: &Path) -> String {
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    blake3::hash(&bytes).to_hex().to_string()
}

/// A full description of everything below `root` (relative path → type, size, mode, owner, mtime, link
/// count, content hash or symlink target), to prove a tree was not touched at all.
pub fn tree_listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
        let md = match fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) => {
                out.insert(rel(root, p), format!("unreadable: {e}"));
                return;
            }
        };
        let common = format!("mode {:o} owner {}:{} mtime {}.{}", md.mode(), md.uid(), md.gid(), md.mtime(), md.mtime_nsec());
        if md.is_dir() {
            out.insert(rel(root, p), format!("dir {common}"));
            let mut kids: Vec<PathBuf> = fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
            kids.sort();
            for k in kids {
                walk(root, &k, out);
            }
        } else if md.file_type().is_symlink() {
            out.insert(rel(root, p), format!("symlink -> {}", fs::read_link(p).unwrap().display()));
        } else {
            out.insert(rel(root, p), format!("file size {} nlink {} {common} blake3 {}", md.len(), md.nlink(), blake3_of(p)));
        }
    }
    fn rel(root: &Path, p: &Path) -> String {
        let r = p.strip_prefix(root).unwrap().display().to_string();
        if r.is_empty() { ".".into() } else { r }
    }
    let mut out = BTreeMap::new();
    if fs::symlink_metadata(root).is_ok() {
        walk(root, root, &mut out);
    }
    out
}

/// Panics with the differences if two [`tree_listing`]s differ.
pub fn assert_same_tree(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>, what: &str) {
    if before == after {
        return;
    }
    let mut diff = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diff.push(format!("- {k}: {v}")),
            Some(w) if w != v => diff.push(format!("~ {k}: {v}\n    now {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            diff.push(format!("+ {k}: {v}"));
        }
    }
    diff.truncate(20);
    panic!("{what}: the tree changed:\n{}", diff.join("\n"));
}

/// Corrupts a file without changing its size: inverts 16 bytes in the middle of it.
pub fn flip_bytes(p: &Path) {
    let mut b = fs::read(p).unwrap();
    let start = b.len() / 2;
    for x in b.iter_mut().skip(start).take(16) {
        *x = !*x;
    }
    // Write in place (same inode), as bit rot would.
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &b))
        .unwrap_or_else(|e| panic!("corrupt {}: {e}", p.display()));
}

/// `doveadm mailbox status -u USER FIELD MAILBOX` → the number.
pub fn mailbox_status(d: &Dovecot, user: &str, field: &str, mailbox: &str) -> u64 {
    let out = d.doveadm_ok(&["-f", "tab", "mailbox", "status", "-u", user, field, mailbox]);
    // `-f tab`: a header line, then "MAILBOX<TAB>VALUE".
    let line = out.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or("");
    line.rsplit('\t').next().unwrap_or("").trim().parse().unwrap_or_else(|_| panic!("mailbox status {field} {mailbox}: unexpected output {out:?}"))
}

/// The currently SELECTed mailbox as `uid → (Message-ID, flags)` (flags normalized, `\Recent` dropped).
pub fn mid_flags(imap: &mut Imap) -> BTreeMap<u32, (String, String)> {
    let lines = imap
        .command("UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        .unwrap_or_else(|e| panic!("UID FETCH: {e}"));
    let mut out = BTreeMap::new();
    for l in &lines {
        if !l.starts_with("* ") || !l.contains(" FETCH (") {
            continue;
        }
        let uid = l.find("UID ").and_then(|p| l[p + 4..].chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u32>().ok());
        let flags = l.find("FLAGS (").and_then(|p| l[p + 7..].find(')').map(|e| l[p + 7..p + 7 + e].to_string()));
        let mid = message_id_in(l.as_bytes());
        if let (Some(uid), Some(flags), Some(mid)) = (uid, flags, mid) {
            out.insert(uid, (mid, normalize_flags(&flags)));
        }
    }
    out
}

/// `uid → unique name` from a folder's `dovecot-uidlist` (in a Maildir or a snapshot).
pub fn uidlist_uniques(folder_dir: &Path) -> BTreeMap<u32, String> {
    let p = folder_dir.join("dovecot-uidlist");
    let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let mut out = BTreeMap::new();
    for l in text.lines().skip(1) {
        let Some((left, name)) = l.split_once(" :") else { continue };
        let Ok(uid) = left.split(' ').next().unwrap_or("").parse::<u32>() else { continue };
        out.insert(uid, name.split(':').next().unwrap().to_string());
    }
    out
}

/// An LD_PRELOAD shim that makes every new thread sleep `SLOW_THREAD_START_MS` (default 100) ms before it
/// runs its start routine, as a thread may wait that long for a CPU on a loaded server. If
/// `SLOW_THREAD_START_LOG` names a file, a line is appended to it per thread, to prove the shim was in use.
const SLOW_THREAD_START_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

struct start { void *(*fn)(void *); void *arg; };

static void *trampoline(void *p)
{
	struct start s = *(struct start *)p;
	const char *ms = getenv("SLOW_THREAD_START_MS");
	const char *log = getenv("SLOW_THREAD_START_LOG");
	long n = ms != NULL ? atol(ms) : 100;
	struct timespec ts = { n / 1000, (n % 1000) * 1000000L };
	free(p);
	if (log != NULL) {
		FILE *f = fopen(log, "a");
		if (f != NULL) {
			fprintf(f, "%ld thread start delayed %ld ms\n", (long)getpid(), n);
			fclose(f);
		}
	}
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
	return s.fn(s.arg);
}

int pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
	static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
	struct start *s;
	int r;

	if (real == NULL)
		real = (int (*)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *))dlsym(RTLD_NEXT, "pthread_create");
	s = malloc(sizeof *s);
	if (s == NULL)
		return EAGAIN;
	s->fn = fn;
	s->arg = arg;
	r = real(t, attr, trampoline, s);
	if (r != 0)
		free(s);
	return r;
}
"#;

/// Builds the slow-thread-start shim once per test process (with `cc`); returns the .so path.
pub fn slow_thread_start_so() -> &'static Path {
    static SO: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &SO.get_or_init(|| {
        let t = super::dovecot_common::tempdir();
        let src = t.path().join("slow_thread_start.c");
        fs::write(&src, SLOW_THREAD_START_C).unwrap();
        let so = t.path().join("slow_thread_start.so");
        let o = Command::new("cc")
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
            .arg(&so)
            .arg(&src)
            .args(["-ldl", "-lpthread"])
            .output()
            .expect("run cc");
        assert!(o.status.success(), "cc {}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
        (t, so)
    })
    .1
}
