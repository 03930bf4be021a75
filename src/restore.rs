//! Restoring from a backup or snapshot into a Maildir that may be live.
//!
//! * Into a target with no mail (or none at all): a full restore that keeps UIDs,
//!   UIDVALIDITY, flags and keywords: each folder's files are delivered through `tmp/` and
//!   its `dovecot-uidlist` and `dovecot-keywords` put in place while holding its lock.
//! * Into a target with mail: a merge. A message whose unique name is already there is
//!   skipped; the others are delivered the Maildir way (written into `tmp/`, renamed into
//!   `cur/` with their flags) under the folder's lock, so Dovecot gives them new UIDs on its
//!   next sync. Keyword letters are remapped to the target's `dovecot-keywords`. Nothing in
//!   the target is overwritten or deleted.
//! Everything selected is checked against the manifest before the target is touched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dotlock::{DotLock, LockError, LockSettings};
use crate::engine::copy::{copy_file, hash_file, CopyError};
use crate::engine::scan::list_folder;
use crate::maildir::folders::{self, Folder};
use crate::maildir::keywords::{Keywords, KEYWORDS_FILE};
use crate::maildir::uidlist::Uidlist;
use crate::maildir::{Layout, MailLocation, MessageName, Subdir, UIDLIST};
use crate::manifest::{FolderRecord, Manifest, MessageRecord, MANIFEST_NAME};
use crate::sysexits::{self, ExitCode};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} is not a maildir-backup backup or snapshot (no readable {MANIFEST_NAME}): {1}")]
    NotASnapshot(PathBuf, String),
    #[error("the snapshot does not match its manifest; nothing was restored:\n  {}", .0.join("\n  "))]
    Corrupt(Vec<String>),
    #[error("no folder {0:?} in the snapshot (it has: {1})")]
    NoSuchFolder(String, String),
    #[error("no message with UID {1} in folder {0:?} of the snapshot")]
    NoSuchUid(String, u32),
    #[error("no message with unique name {0:?} in the snapshot")]
    NoSuchMessage(String),
    #[error("bad --uid {0:?}: expected FOLDER:UID")]
    BadUid(String),
    #[error("target {0} exists but is not a Maildir (no cur/ directory); nothing was restored")]
    TargetNotMaildir(PathBuf),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl ExitCode for RestoreError {
    fn exit_code(&self) -> i32 {
        match self {
            RestoreError::NotASnapshot(..) => sysexits::EX_NOINPUT,
            RestoreError::Corrupt(_) => sysexits::EX_DATAERR,
            RestoreError::NoSuchFolder(..) | RestoreError::NoSuchUid(..) | RestoreError::NoSuchMessage(_) | RestoreError::BadUid(_) => sysexits::EX_USAGE,
            RestoreError::TargetNotMaildir(_) => sysexits::EX_DATAERR,
            RestoreError::Io { source, .. } => sysexits::for_io_error(source),
            RestoreError::Lock(e) => e.exit_code(),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RestoreError + 'a {
    move |source| RestoreError::Io { op, path: path.to_path_buf(), source }
}

#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    /// Folder names (as Dovecot names them) to restore whole; empty with no messages = all.
    pub folders: Vec<String>,
    /// Unique names of single messages.
    pub messages: Vec<String>,
    /// `FOLDER:UID` of single messages, UIDs as in the snapshot.
    pub uids: Vec<String>,
    pub dry_run: bool,
    pub lock: LockSettings,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreReport {
    /// "full" or "merge".
    pub mode: String,
    pub restored: u64,
    pub skipped: u64,
    pub folders_created: u64,
    /// One line per message: what was (or, with --dry-run, would be) done.
    pub actions: Vec<String>,
    pub warnings: Vec<String>,
}

impl RestoreReport {
    fn skip(&mut self, folder: &str, unique: &str) {
        self.skipped += 1;
        self.actions.push(format!("skip {folder}/{unique} (already in the target)"));
    }
    fn restore(&mut self, folder: &str, name: &str) {
        self.restored += 1;
        self.actions.push(format!("restore {folder}/{name}"));
    }
}

/// Which folder a message goes to, and the message itself.
struct Selected<'m> {
    folder: &'m FolderRecord,
    msg: &'m MessageRecord,
}

fn select<'m>(snapshot: &Path, manifest: &'m Manifest, req: &RestoreRequest) -> Result<Vec<Selected<'m>>, RestoreError> {
    let folder_by_name = |name: &str| -> Result<&'m FolderRecord, RestoreError> {
        manifest.folders.iter().find(|f| f.name == name || f.path == name).ok_or_else(|| {
            let have: Vec<&str> = manifest.folders.iter().map(|f| f.name.as_str()).collect();
            RestoreError::NoSuchFolder(name.to_string(), have.join(", "))
        })
    };
    let folder_of = |m: &MessageRecord| manifest.folders.iter().find(|f| f.path == m.folder);
    let mut chosen: BTreeMap<(String, String), Selected<'m>> = BTreeMap::new();
    let mut add = |f: &'m FolderRecord, m: &'m MessageRecord| {
        chosen.insert((m.folder.clone(), m.unique.clone()), Selected { folder: f, msg: m });
    };
    let whole_folders: Vec<&FolderRecord> = if req.folders.is_empty() && req.messages.is_empty() && req.uids.is_empty() {
        manifest.folders.iter().collect()
    } else {
        req.folders.iter().map(|n| folder_by_name(n)).collect::<Result<_, _>>()?
    };
    for f in &whole_folders {
        for m in manifest.messages.iter().filter(|m| m.folder == f.path) {
            add(f, m);
        }
    }
    for unique in &req.messages {
        let m = manifest.messages.iter().find(|m| &m.unique == unique).ok_or_else(|| RestoreError::NoSuchMessage(unique.clone()))?;
        add(folder_of(m).ok_or_else(|| RestoreError::NoSuchMessage(unique.clone()))?, m);
    }
    for spec in &req.uids {
        let (fname, uid) = spec.rsplit_once(':').ok_or_else(|| RestoreError::BadUid(spec.clone()))?;
        let uid: u32 = uid.parse().map_err(|_| RestoreError::BadUid(spec.clone()))?;
        let f = folder_by_name(fname)?;
        let uidlist = Uidlist::read(&snapshot.join(&f.path).join(UIDLIST)).map_err(|_| RestoreError::NoSuchUid(fname.to_string(), uid))?;
        let unique = uidlist.entries.iter().find(|e| e.uid == uid).map(|e| e.unique.split(':').next().unwrap_or(&e.unique).to_string());
        let m = unique
            .and_then(|u| manifest.messages.iter().find(|m| m.folder == f.path && m.unique == u))
            .ok_or_else(|| RestoreError::NoSuchUid(fname.to_string(), uid))?;
        add(f, m);
    }
    Ok(chosen.into_values().collect())
}

/// The target folder's path for a snapshot folder (layouts may differ).
fn target_rel(f: &FolderRecord, from: Layout, to: Layout) -> PathBuf {
    if f.path.is_empty() || from == to {
        return PathBuf::from(&f.path);
    }
    match to {
        Layout::MaildirPlusPlus => PathBuf::from(format!(".{}", f.name.replace('/', "."))),
        Layout::Fs => PathBuf::from(f.name.replace('.', "/")),
    }
}

fn has_mail(target: &MailLocation) -> Result<bool, RestoreError> {
    let (found, _) = folders::discover(target).map_err(|e| RestoreError::Io { op: e.op, path: e.path, source: e.source })?;
    for f in found {
        match list_folder(&f.mail_dir) {
            Ok(l) if !l.entries.is_empty() => return Ok(true),
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(crate::engine::scan::ScanError::Io { source, .. }) => return Err(RestoreError::Io { op: "list", path: f.mail_dir.clone(), source }),
            Err(e) => return Err(RestoreError::Io { op: "list", path: f.mail_dir.clone(), source: io::Error::other(e.to_string()) }),
        }
    }
    Ok(false)
}

/// Owner for everything we create: the target root's, else the snapshot's.
fn owner_for(target_root: &Path, snapshot: &Path) -> Option<(u32, u32)> {
    if !crate::engine::copy::running_as_root() {
        return None;
    }
    let md = fs::metadata(target_root).or_else(|_| fs::metadata(snapshot)).ok()?;
    Some((md.uid(), md.gid()))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), RestoreError> {
    if let Some((u, g)) = owner {
        nix::unistd::chown(path, Some(u.into()), Some(g.into())).map_err(|e| io_err("chown", path)(e.into()))?;
    }
    Ok(())
}

fn mkdirs(dir: &Path, owner: Option<(u32, u32)>) -> Result<bool, RestoreError> {
    if dir.is_dir() {
        return Ok(false);
    }
    if let Some(parent) = dir.parent() {
        mkdirs(parent, owner)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", dir))?;
            chown(dir, owner)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err("create directory", dir)(e)),
    }
}

/// Creates a folder's cur/ new/ tmp/ (and maildirfolder for Maildir++ subfolders).
fn ensure_folder(target: &MailLocation, folder: &Folder, owner: Option<(u32, u32)>) -> Result<bool, RestoreError> {
    let created = !folders::is_maildir(&folder.mail_dir);
    for sub in ["cur", "new", "tmp"] {
        mkdirs(&folder.mail_dir.join(sub), owner)?;
    }
    mkdirs(&folder.control_dir, owner)?;
    if created && target.layout == Layout::MaildirPlusPlus && !folder.is_inbox() {
        let mf = folder.mail_dir.join("maildirfolder");
        fs::write(&mf, b"").map_err(io_err("create", &mf))?;
        chown(&mf, owner)?;
    }
    Ok(created)
}

/// A unique name Dovecot has never seen, keeping the `,S=`/`,W=` sizes of the original.
fn fresh_unique(original: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let sizes: String = original.split(',').skip(1).filter(|p| p.starts_with("S=") || p.starts_with("W=")).map(|p| format!(",{p}")).collect();
    format!(
        "{}.M{}P{}Q{}.{}{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        crate::dotlock::my_hostname().replace(['/', ':'], "_"),
        sizes
    )
}

/// Files we put into a target's tmp/: removed again if the restore stops before moving them
/// into place, so a failed restore leaves nothing behind in a live Maildir.
#[derive(Default)]
struct TmpFiles(Vec<PathBuf>);

impl TmpFiles {
    fn add(&mut self, p: PathBuf) -> PathBuf {
        self.0.push(p.clone());
        p
    }
}

impl Drop for TmpFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p); // already renamed into place: nothing there
        }
    }
}

/// Copies `src` into the folder's tmp/ as `name`, with `owner`.
fn deliver_to_tmp(src: &Path, folder: &Folder, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf, RestoreError> {
    let tmp = folder.mail_dir.join("tmp").join(name);
    match copy_file(src, &tmp, false) {
        Ok(_) => {}
        Err(CopyError::SourceVanished) => return Err(io_err("read", src)(io::Error::from(io::ErrorKind::NotFound))),
        Err(CopyError::Source(e)) => return Err(io_err("read", src)(e)),
        Err(CopyError::Dest(e)) => return Err(io_err("write", &tmp)(e)),
    }
    chown(&tmp, owner)?;
    Ok(tmp)
}

/// Restores from `snapshot` into `target` as the request says.
pub fn restore(snapshot: &Path, target: &MailLocation, req: &RestoreRequest) -> Result<RestoreReport, RestoreError> {
    let manifest = Manifest::read(&snapshot.join(MANIFEST_NAME)).map_err(|e| RestoreError::NotASnapshot(snapshot.to_path_buf(), e.to_string()))?;
    let selected = select(snapshot, &manifest, req)?;

    // Check every selected file before touching the target.
    let mut bad = Vec::new();
    for s in &selected {
        let path = snapshot.join(&s.msg.folder).join(s.msg.dir.as_str()).join(&s.msg.name);
        match hash_file(&path) {
            Ok((size, sum)) if size == s.msg.size && sum == s.msg.blake3 => {}
            Ok(_) => bad.push(format!("{}: content differs from the manifest", path.display())),
            Err(e) => bad.push(format!("{}: {e}", path.display())),
        }
    }
    if !bad.is_empty() {
        return Err(RestoreError::Corrupt(bad));
    }

    let exists = fs::symlink_metadata(&target.root).is_ok();
    if exists && !folders::is_maildir(&target.root) {
        let empty = fs::read_dir(&target.root).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty {
            return Err(RestoreError::TargetNotMaildir(target.root.clone()));
        }
    }
    let full = !exists || !folders::is_maildir(&target.root) || !has_mail(target)?;
    let mut report = RestoreReport { mode: if full { "full" } else { "merge" }.to_string(), ..Default::default() };
    let owner = owner_for(&target.root, snapshot);

    // Group by folder, in snapshot order.
    let mut by_folder: BTreeMap<&str, (&FolderRecord, Vec<&MessageRecord>)> = BTreeMap::new();
    for s in &selected {
        by_folder.entry(s.folder.path.as_str()).or_insert((s.folder, Vec::new())).1.push(s.msg);
    }
    if req.dry_run {
        for (f, msgs) in by_folder.values() {
            let tf = Folder::at(target, target_rel(f, manifest.header.layout, target.layout));
            let present = Present::of(&tf);
            for m in msgs {
                if present.has(m) {
                    report.skip(&f.name, &m.unique);
                } else {
                    report.restore(&f.name, &format!("{} flags {:?}", m.unique, m.flags));
                }
            }
        }
        return Ok(report);
    }

    if !exists {
        mkdirs(&target.root, owner)?;
    }
    for (f, msgs) in by_folder.values() {
        let tf = Folder::at(target, target_rel(f, manifest.header.layout, target.layout));
        if ensure_folder(target, &tf, owner)? {
            report.folders_created += 1;
        }
        let snap_dir = snapshot.join(&f.path);
        // The snapshot's UIDs are kept only where the target never gave out UIDs under another
        // UIDVALIDITY: putting an older one back could hand out UIDs clients already saw.
        let snap_v = Uidlist::read(&snap_dir.join(UIDLIST)).ok().and_then(|u| u.uid_validity);
        let keeps_uids = match Uidlist::read(&tf.control_dir.join(UIDLIST)) {
            Ok(old) => old.uid_validity == snap_v,
            Err(crate::maildir::uidlist::UidlistError::Io { source, .. }) => source.kind() == io::ErrorKind::NotFound,
            Err(_) => false,
        };
        if full && !keeps_uids {
            report.warnings.push(format!(
                "{}: the target's UIDVALIDITY differs from the snapshot's; merged with new UIDs instead of keeping the old ones",
                f.name
            ));
        }
        if full && keeps_uids {
            restore_folder_full(&snap_dir, &tf, f, msgs, owner, req, &mut report)?;
        } else {
            restore_folder_merge(&snap_dir, &tf, f, msgs, owner, req, &mut report)?;
        }
    }
    if full {
        // Per-user files, only where the target has none.
        for e in fs::read_dir(snapshot).map_err(io_err("read directory", snapshot))?.flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n == "subscriptions" || n.starts_with("dovecot-uidvalidity") {
                let dst = target.control_root().join(&name);
                mkdirs(target.control_root(), owner)?;
                if !dst.exists() {
                    if let Ok(_) | Err(CopyError::SourceVanished) = copy_file(&e.path(), &dst, false) {}
                    chown(&dst, owner)?;
                }
            }
        }
    }
    Ok(report)
}

/// What a target folder already holds: its unique names, and its files by size, so that a
/// message an earlier restore delivered under a fresh name (see `fresh_unique`) is recognised
/// by its content and not delivered a second time.
struct Present {
    uniques: HashSet<String>,
    by_size: HashMap<u64, Vec<PathBuf>>,
}

impl Present {
    fn of(folder: &Folder) -> Present {
        let mut p = Present { uniques: HashSet::new(), by_size: HashMap::new() };
        if let Ok(l) = list_folder(&folder.mail_dir) {
            for e in l.entries.values() {
                if let Some(n) = MessageName::parse(&e.name) {
                    p.uniques.insert(n.unique().to_string());
                }
                let path = folder.mail_dir.join(e.sub.as_str()).join(&e.name);
                if let Ok(md) = fs::metadata(&path) {
                    p.by_size.entry(md.len()).or_default().push(path);
                }
            }
        }
        p
    }

    fn has(&self, m: &MessageRecord) -> bool {
        self.uniques.contains(&m.unique)
            || self.by_size.get(&m.size).is_some_and(|paths| paths.iter().any(|p| matches!(hash_file(p), Ok((_, sum)) if sum == m.blake3)))
    }
}

fn lock_folder(folder: &Folder, set: &LockSettings) -> Result<DotLock, RestoreError> {
    Ok(DotLock::acquire(&folder.control_dir.join(UIDLIST), set)?)
}

/// Full restore of one folder: same names, same uidlist and keywords, under the lock.
fn restore_folder_full(
    snap_dir: &Path,
    tf: &Folder,
    f: &FolderRecord,
    msgs: &[&MessageRecord],
    owner: Option<(u32, u32)>,
    req: &RestoreRequest,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let mut staged = Vec::new();
    let mut tmp = TmpFiles::default();
    for m in msgs {
        let name = format!("{}.restore", fresh_unique(&m.unique));
        let t = tmp.add(deliver_to_tmp(&snap_dir.join(m.dir.as_str()).join(&m.name), tf, &name, owner)?);
        staged.push((t, tf.mail_dir.join(m.dir.as_str()).join(&m.name), m));
    }
    let lock = lock_folder(tf, &req.lock)?;
    for (tmp, dst, m) in staged {
        if dst.exists() {
            let _ = fs::remove_file(&tmp);
            report.skip(&f.name, &m.unique);
            continue;
        }
        fs::rename(&tmp, &dst).map_err(io_err("rename into place", &dst))?;
        report.restore(&f.name, &m.name);
    }
    let src_uidlist = snap_dir.join(UIDLIST);
    if src_uidlist.exists() {
        let mut text = fs::read_to_string(&src_uidlist).map_err(io_err("read", &src_uidlist))?;
        let dst = tf.control_dir.join(UIDLIST);
        // Never move the UID counter backwards within the same UIDVALIDITY.
        if let (Ok(old), Ok(new)) = (Uidlist::read(&dst), Uidlist::parse(&text, "snapshot")) {
            if old.uid_validity == new.uid_validity && old.next_uid > new.next_uid {
                let header: Vec<String> = new
                    .header
                    .split(' ')
                    .map(|p| if p.starts_with('N') { format!("N{}", old.next_uid.unwrap_or(0)) } else { p.to_string() })
                    .collect();
                text = text.replacen(&new.header, &header.join(" "), 1);
            }
        }
        write_replacing(&dst, text.as_bytes(), owner)?;
    }
    let src_kw = snap_dir.join(KEYWORDS_FILE);
    if src_kw.exists() {
        let bytes = fs::read(&src_kw).map_err(io_err("read", &src_kw))?;
        write_replacing(&tf.control_dir.join(KEYWORDS_FILE), &bytes, owner)?;
    }
    lock.release()?;
    Ok(())
}

fn write_replacing(dst: &Path, bytes: &[u8], owner: Option<(u32, u32)>) -> Result<(), RestoreError> {
    let tmp = dst.with_extension(format!("maildir-backup-restore.{}", std::process::id()));
    fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    chown(&tmp, owner)?;
    fs::rename(&tmp, dst).map_err(io_err("rename into place", dst))
}

/// Merge into a live folder: skip what is there, deliver the rest with new UIDs to come.
fn restore_folder_merge(
    snap_dir: &Path,
    tf: &Folder,
    f: &FolderRecord,
    msgs: &[&MessageRecord],
    owner: Option<(u32, u32)>,
    req: &RestoreRequest,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let snap_kw = Keywords::read(&snap_dir.join(KEYWORDS_FILE)).map_err(io_err("read", &snap_dir.join(KEYWORDS_FILE)))?;
    let already = Present::of(tf);
    let mut staged = Vec::new();
    let mut tmp = TmpFiles::default();
    for m in msgs {
        if already.has(m) {
            report.skip(&f.name, &m.unique);
            continue;
        }
        let tmp_name = format!("{}.restore", fresh_unique(&m.unique));
        staged.push((tmp.add(deliver_to_tmp(&snap_dir.join(m.dir.as_str()).join(&m.name), tf, &tmp_name, owner)?), *m));
    }
    let lock = lock_folder(tf, &req.lock)?;
    let kw_path = tf.control_dir.join(KEYWORDS_FILE);
    let mut target_kw = Keywords::read(&kw_path).map_err(io_err("read", &kw_path))?;
    let kw_before = target_kw.clone();
    let present = Present::of(tf);
    let known: HashSet<String> = Uidlist::read(&tf.control_dir.join(UIDLIST))
        .map(|u| u.entries.into_iter().map(|e| e.unique.split(':').next().unwrap_or(&e.unique).to_string()).collect())
        .unwrap_or_default();
    for (tmp, m) in staged {
        if present.has(m) {
            let _ = fs::remove_file(&tmp);
            report.skip(&f.name, &m.unique);
            continue;
        }
        let mut flags: Vec<char> = Vec::new();
        for c in m.flags.chars() {
            if c.is_ascii_lowercase() {
                match snap_kw.name_of(c).and_then(|name| target_kw.letter_for(name)) {
                    Some(l) => flags.push(l),
                    None => report.warnings.push(format!("{}/{}: keyword letter {c} dropped (unknown or no free letter)", f.name, m.unique)),
                }
            } else {
                flags.push(c);
            }
        }
        flags.sort_unstable();
        flags.dedup();
        // A unique name the target's uidlist still remembers would get its old UID back.
        let unique = if known.contains(&m.unique) { fresh_unique(&m.unique) } else { m.unique.clone() };
        let name = crate::maildir::filename::with_flags(&unique, &flags.into_iter().collect::<String>());
        let dst = tf.mail_dir.join(Subdir::Cur.as_str()).join(&name);
        fs::rename(&tmp, &dst).map_err(io_err("rename into place", &dst))?;
        report.restore(&f.name, &name);
    }
    if target_kw != kw_before {
        let old = fs::metadata(&kw_path).ok();
        let mode = old.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0o600);
        target_kw.write(&kw_path, mode).map_err(io_err("write", &kw_path))?;
        chown(&kw_path, owner)?;
        // Dovecot re-reads dovecot-keywords only when its mtime, in whole seconds, differs from
        // what it last read (and makes it grow on each of its own rewrites): a rewrite within
        // the same second would go unnoticed, and a running session would write "unknown-N"
        // back over our new letters.
        if let Some(old) = old {
            let new_mtime = fs::metadata(&kw_path).map_err(io_err("stat", &kw_path))?.mtime();
            if new_mtime <= old.mtime() {
                let t = nix::sys::time::TimeSpec::new(old.mtime() + 1, 0);
                nix::sys::stat::utimensat(None, &kw_path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| io_err("set mtime of", &kw_path)(e.into()))?;
            }
        }
    }
    lock.release()?;
    Ok(())
}
