//! Reading a backup back: through Dovecot (either release, as the user's mail or through a location
//! override) and from its own files (manifest, uidlist, keywords, file names), to compare a backup with its
//! source and with itself. Plus the directories and users files the plugin tests hand to doveadm.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use maildir_backup::manifest::Manifest;

use super::dovecot::{Instance, Release};
use super::dovecot_common::{chown_recursive, ensure_vmail, normalize_flags, tempdir};
use super::trixie;

// ---------------------------------------------------------------------------------------------------------
// Directories and users for doveadm

/// A directory owned by `ids` (mode 0755) at `path`, created with its parents.
fn owned_dir(path: &Path, ids: (u32, u32)) -> PathBuf {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    chown_recursive(path, ids);
    path.to_path_buf()
}

/// A directory owned by the host's vmail (mode 0755) at `path`, created with its parents.
pub fn vmail_dir(path: &Path) -> PathBuf {
    owned_dir(path, ensure_vmail())
}

/// A directory (host path, inside ROOT) owned by the 2.4 root's vmail (mode 0755), created with its parents.
pub fn vmail_dir24(path: &Path) -> PathBuf {
    owned_dir(path, trixie::vmail_ids())
}

/// A fresh temp dir that the host's vmail can write (doveadm writes backups with vmail's privileges).
pub fn vmail_tempdir() -> tempfile::TempDir {
    let t = tempdir();
    chown_recursive(t.path(), ensure_vmail());
    t
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
pub fn tree_modes(root: &Path) -> BTreeMap<String, u32> {
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
    for (rel, _) in tree_modes(dir) {
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

/// Panics listing `problems` (from the checks below) unless there are none.
pub fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// A 2.3-style location (host paths; either release takes it, see `Instance::fetch_uid_flags`) that reads
/// `backup` as a Maildir without writing index files into it.
pub fn backup_location(backup: &Path, layout_fs: bool) -> String {
    format!("maildir:{}:INDEX=MEMORY{}", backup.display(), if layout_fs { ":LAYOUT=fs" } else { "" })
}

fn overrides<R: Release>(location: Option<&str>) -> Vec<String> {
    location.map(R::location_overrides).unwrap_or_default()
}

/// Selectable mailboxes of `user` (as Dovecot names them) → their mail directory (host path), optionally
/// reading another location (see [`backup_location`]). Names without a Maildir (e.g. Maildir++ parents)
/// are left out.
pub fn mailboxes<R: Release>(d: &Instance<R>, user: &str, location: Option<&str>) -> BTreeMap<String, PathBuf> {
    let ov = overrides::<R>(location);
    let out = d.doveadm_with(&ov, &["-f", "tab", "mailbox", "list", "-u", user]);
    let mut m = BTreeMap::new();
    for (i, name) in out.lines().enumerate() {
        if (i == 0 && name == "mailbox") || name.is_empty() {
            continue;
        }
        let path = d.doveadm_with(&ov, &["mailbox", "path", "-u", user, "-t", "mailbox", name]);
        let path = R::host(Path::new(path.trim_end_matches('\n')));
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

/// `doveadm [-o location…] -f tab fetch -u user 'uid guid flags' mailbox MAILBOX`, sorted by uid.
pub fn fetch<R: Release>(d: &Instance<R>, user: &str, mailbox: &str, location: Option<&str>) -> Vec<Msg> {
    let out = d.doveadm_with(&overrides::<R>(location), &["-f", "tab", "fetch", "-u", user, "uid guid flags", "mailbox", mailbox]);
    parse_uid_guid_flags(&out)
}

/// `doveadm mailbox status -u USER FIELD MAILBOX` → the number.
pub fn mailbox_status<R: Release>(d: &Instance<R>, user: &str, field: &str, mailbox: &str) -> u64 {
    let out = d.doveadm_ok(&["-f", "tab", "mailbox", "status", "-u", user, field, mailbox]);
    let line = out.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or("");
    line.rsplit('\t')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("mailbox status {field} {mailbox}: unexpected output {out:?}"))
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

/// Dovecot (as `reader`) reads `backup` (for 2.4: inside ROOT; vmail-accessible): for every folder of its
/// manifest, uids, GUIDs and flags agree with the backup's own uidlist and file names, and Dovecot finds
/// exactly the manifest's folders. Returns the problems (empty: consistent).
pub fn check_dovecot_reads_backup<R: Release>(d: &Instance<R>, reader: &str, backup: &Path, layout_fs: bool) -> Vec<String> {
    let manifest = read_manifest(backup);
    let norm = |p: &Path| PathBuf::from(p.to_string_lossy().trim_end_matches('/'));
    let want: BTreeSet<PathBuf> = manifest.folders.iter().map(|f| norm(&backup.join(&f.path))).collect();
    // Views first: Dovecot may write to the folders it opens.
    let views: BTreeMap<PathBuf, FolderView> = want.iter().map(|p| (p.clone(), folder_view(p))).collect();
    let loc = backup_location(backup, layout_fs);
    let boxes = mailboxes(d, reader, Some(&loc));
    let mut problems = Vec::new();
    let found: BTreeSet<PathBuf> = boxes.values().map(|p| norm(p)).collect();
    if found != want {
        problems.push(format!("{}: {} sees folders {found:?}, the manifest has {want:?}", backup.display(), R::NAME));
    }
    for (name, path) in &boxes {
        let Some(view) = views.get(&norm(path)) else { continue };
        let got = fetch(d, reader, name, Some(&loc));
        for p in compare_view(view, &got) {
            problems.push(format!("{} mailbox {name}: {p}", backup.display()));
        }
    }
    problems
}

/// `user`'s own mail and `backup` read through Dovecot (the backup as `reader`): same mailboxes, and in each
/// the same (uid, guid, flags). Returns the problems.
pub fn compare_source_and_backup<R: Release>(d: &Instance<R>, user: &str, reader: &str, backup: &Path, layout_fs: bool) -> Vec<String> {
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

/// Rows of `-f json` grouped: user → mailbox → messages.
pub fn rows_by_user(rows: &[BTreeMap<String, String>]) -> HashMap<String, BTreeMap<String, u64>> {
    let mut m: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    for r in rows {
        m.entry(r["user"].clone())
            .or_default()
            .insert(r["mailbox"].clone(), r["messages"].parse().unwrap_or_else(|_| panic!("row {r:?}: messages")));
    }
    m
}
