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
//!
//! Everything selected is checked against the manifest before the target is touched.
//!
//! The target belongs to its user, who may be hostile and may race us: everything in it is
//! done through directory descriptors (`fsx`), files are created `O_EXCL` under random names
//! and handed over with `fchown` on the descriptor, and a symlink anywhere in the target is
//! refused, never followed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dotlock::{DotLock, LockError, LockSettings};
use crate::fsx::{self, Dir, FsError, Kind, Owner, Replace};
use crate::maildir::folders::{self, Folder};
use crate::maildir::keywords::{Keywords, KEYWORDS_FILE};
use crate::maildir::uidlist::{self, UidlistError};
use crate::store::MessageDirs;
use crate::maildir::{is_user_control_file, Layout, MailLocation, Maildir, MessageName, Subdir, MAILDIRFOLDER, MESSAGE_DIRS, UIDLIST};
use crate::manifest::{check_folder_path, FolderRecord, Manifest, ManifestError, MessageRecord, MANIFEST_NAME};
use crate::sysexits::{self, ExitCode};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} is not a maildir-backup backup or snapshot (no readable {MANIFEST_NAME}): {1}")]
    NotASnapshot(PathBuf, String),
    #[error("the snapshot's manifest is not usable; nothing was restored: {0}")]
    BadManifest(ManifestError),
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
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Uidlist(#[from] UidlistError),
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl ExitCode for RestoreError {
    fn exit_code(&self) -> i32 {
        match self {
            RestoreError::NotASnapshot(..) => sysexits::EX_NOINPUT,
            RestoreError::BadManifest(_) | RestoreError::Corrupt(_) | RestoreError::TargetNotMaildir(_) => sysexits::EX_DATAERR,
            RestoreError::NoSuchFolder(..) | RestoreError::NoSuchUid(..) | RestoreError::NoSuchMessage(_) | RestoreError::BadUid(_) => sysexits::EX_USAGE,
            RestoreError::Fs(e) => e.exit_code(),
            RestoreError::Uidlist(e) => e.exit_code(),
            RestoreError::Lock(e) => e.exit_code(),
        }
    }
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

fn select<'m>(snapshot: &Dir, manifest: &'m Manifest, req: &RestoreRequest) -> Result<Vec<Selected<'m>>, RestoreError> {
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
    let mut messages_of: HashMap<&str, Vec<&'m MessageRecord>> = HashMap::new();
    for m in &manifest.messages {
        messages_of.entry(m.folder.as_str()).or_default().push(m);
    }
    for f in &whole_folders {
        for m in messages_of.get(f.path.as_str()).into_iter().flatten() {
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
        let unique = uid_to_unique(snapshot, f, uid)?;
        let m = unique
            .and_then(|u| manifest.messages.iter().find(|m| m.folder == f.path && m.unique == u))
            .ok_or_else(|| RestoreError::NoSuchUid(fname.to_string(), uid))?;
        add(f, m);
    }
    Ok(chosen.into_values().collect())
}

/// The unique name of the message with `uid` in a snapshot folder's uidlist.
fn uid_to_unique(snapshot: &Dir, f: &FolderRecord, uid: u32) -> Result<Option<String>, RestoreError> {
    let no_such = || RestoreError::NoSuchUid(f.name.clone(), uid);
    let dir = snapshot.sub(&f.path).map_err(|_| no_such())?;
    let Some(reader) = uidlist::Reader::open(&dir)? else { return Err(no_such()) };
    for e in reader {
        let e = e?;
        if e.uid == uid {
            return Ok(Some(e.unique));
        }
    }
    Ok(None)
}

/// The target folder's path for a snapshot folder (layouts may differ).
fn target_rel(f: &FolderRecord, from: Layout, to: Layout) -> Result<PathBuf, RestoreError> {
    let rel = if f.path.is_empty() || from == to {
        f.path.clone()
    } else {
        match to {
            Layout::MaildirPlusPlus => format!(".{}", f.name.replace('/', ".")),
            Layout::Fs => f.name.replace('.', "/"),
        }
    };
    check_folder_path(&rel, to).map_err(|what| RestoreError::BadManifest(ManifestError::Bad { path: MANIFEST_NAME.into(), line: 0, what }))?;
    Ok(PathBuf::from(rel))
}

/// True if any folder of the target holds a message.
fn has_mail(md: &Maildir) -> Result<bool, RestoreError> {
    let (found, _) = folders::discover(md)?;
    for f in found {
        let Some(dir) = md.root.sub_opt(&f.rel)? else { continue };
        for sub in Subdir::ALL {
            let Some(d) = dir.sub_opt(sub.as_str())? else { continue };
            if d.list()?.iter().any(|e| e.kind == Kind::File && e.name.to_str().and_then(MessageName::parse).is_some()) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The owner for everything we create (only root gives files away): the target root's,
/// else the owner the backup recorded, if the snapshot is one we (or root) made; else the
/// snapshot's own (older backups, or one a user made and could have edited).
fn owner_for(target_root: Option<&Dir>, manifest: &Manifest, snapshot: &Dir) -> Result<Option<Owner>, RestoreError> {
    if !fsx::running_as_root() {
        return Ok(None);
    }
    if let Some(t) = target_root {
        return Ok(Some(t.stat()?.owner()));
    }
    let snap = snapshot.stat()?;
    let ours = snap.owner().uid == 0 && snap.mode() & 0o022 == 0;
    Ok(Some(match manifest.header.owner {
        Some(o) if ours => o,
        _ => snap.owner(),
    }))
}

/// A target folder's directories, opened (created where missing).
struct TargetFolder {
    name: String,
    cur: Dir,
    new: Dir,
    tmp: Dir,
    control: std::sync::Arc<Dir>,
}

impl TargetFolder {
    fn subdirs(&self) -> Result<Vec<Dir>, RestoreError> {
        Ok(vec![self.cur.try_clone()?, self.new.try_clone()?])
    }

    fn sub(&self, sub: Subdir) -> &Dir {
        match sub {
            Subdir::Cur => &self.cur,
            Subdir::New => &self.new,
        }
    }
}

/// Opens (creating what is missing) a target folder's cur/ new/ tmp/, its control dir and,
/// for a new Maildir++ subfolder, its maildirfolder file. True if the folder was created.
fn ensure_folder(target: &Targets, tf: &Folder, owner: Option<Owner>) -> Result<(TargetFolder, bool), RestoreError> {
    let dir = target.root.ensure_dirs(&tf.rel, 0o700, owner)?;
    let created = !folders::is_maildir(&dir)?;
    let [cur, new, tmp] = MESSAGE_DIRS.map(|s| dir.ensure_dir(s, 0o700, owner).map(|(d, _)| d));
    let control = target.control_root(owner)?.ensure_dirs(&tf.control_rel, 0o700, owner)?;
    if created && target.layout == Layout::MaildirPlusPlus && !tf.is_inbox() {
        match dir.create(MAILDIRFOLDER, 0o600) {
            Ok(f) => {
                if let Some(o) = owner {
                    fsx::set_owner(&f, o).map_err(|e| FsError::Io { op: "chown", path: dir.show(MAILDIRFOLDER), source: e })?;
                }
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((TargetFolder { name: tf.name.clone(), cur: cur?, new: new?, tmp: tmp?, control: std::sync::Arc::new(control) }, created))
}

/// The target's roots: the Maildir root and, with CONTROL=, the control root (created on
/// first need).
struct Targets {
    loc: MailLocation,
    root: Dir,
    layout: Layout,
    control: std::cell::OnceCell<Dir>,
}

impl Targets {
    fn control_root(&self, owner: Option<Owner>) -> Result<&Dir, RestoreError> {
        let Some(path) = &self.loc.control else { return Ok(&self.root) };
        if let Some(d) = self.control.get() {
            return Ok(d);
        }
        let (d, _) = Dir::open_or_create(path, 0o700, owner)?;
        Ok(self.control.get_or_init(|| d))
    }
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
struct TmpFiles<'a> {
    tmp: &'a Dir,
    names: Vec<String>,
}

impl Drop for TmpFiles<'_> {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.tmp.unlink(n); // already renamed into place: nothing there
        }
    }
}

/// Snapshot files with several names already delivered, still open: their other names are
/// delivered as links to the same copy (a restore takes no more room than its snapshot).
#[derive(Default)]
struct Delivered(HashMap<(u64, u64), std::fs::File>);

/// How many such files stay open at once.
const MAX_DELIVERED: usize = 1024;

/// One restore under way: where from, for whom, what it did so far.
struct Session<'a> {
    snap: &'a Dir,
    messages: MessageDirs,
    owner: Option<Owner>,
    req: &'a RestoreRequest,
    report: RestoreReport,
    delivered: Delivered,
}

impl Session<'_> {
    /// Lets go of a folder's lock; one someone took from us meanwhile is reported.
    fn release(&mut self, lock: DotLock) -> Result<(), RestoreError> {
        let (path, held) = (lock.lock_path(), lock.held_for());
        let outcome = lock.release()?;
        self.report.warnings.extend(crate::dotlock::release_warning(&path, outcome, held));
        Ok(())
    }

    /// Copies the snapshot file `m` into the folder's tmp/ under a new random name, owned by
    /// the target's owner (set on the descriptor: whatever the user does to tmp/ meanwhile,
    /// we never chown anything else).
    fn deliver(&mut self, m: &MessageRecord, tmp: &mut TmpFiles) -> Result<String, RestoreError> {
        let mut src = self.messages.open_message(&m.folder, m.dir, &m.name)?;
        let prefix = format!("{}.restore", fresh_unique(&m.unique));
        let id = (src.meta.dev(), src.meta.ino());
        if let Some(copy) = self.delivered.0.get(&id) {
            if let Ok(name) = tmp.tmp.link_open_file(copy, &prefix) {
                tmp.names.push(name.clone());
                return Ok(name);
            }
        }
        let (name, out) = tmp.tmp.create_temp(&prefix, 0o600)?;
        tmp.names.push(name.clone());
        fsx::copy_file(&mut src, &out, self.owner).map_err(|fail| match fail {
            fsx::CopyFail::Source(e) => FsError::Io { op: "read", path: src.path.clone(), source: e },
            fsx::CopyFail::Dest(e) => FsError::Io { op: "write", path: tmp.tmp.show(&name), source: e },
        })?;
        if src.meta.nlink() > 1 && self.delivered.0.len() < MAX_DELIVERED {
            self.delivered.0.insert(id, out);
        }
        Ok(name)
    }
}

/// Restores from `snapshot` into `target` as the request says.
pub fn restore(snapshot: &Path, target: &MailLocation, req: &RestoreRequest) -> Result<RestoreReport, RestoreError> {
    let snap = crate::repo::open_snapshot(snapshot).map_err(|e| RestoreError::NotASnapshot(snapshot.to_path_buf(), e.to_string()))?;
    let manifest = match Manifest::read(&snap) {
        Ok(m) => m,
        Err(ManifestError::Fs(e)) => return Err(RestoreError::NotASnapshot(snapshot.to_path_buf(), e.to_string())),
        Err(e) => return Err(RestoreError::BadManifest(e)),
    };
    let selected = select(&snap, &manifest, req)?;
    // Where each folder goes, checked (with every selected file) before the target is touched.
    let by_folder = group_by_target_folder(&selected, manifest.header.layout, target.layout)?;
    check_selected(&snap, &selected)?;

    let existing = match Dir::open_opt(&target.root)? {
        Some(d) if folders::is_maildir(&d)? => Some(d),
        Some(d) if d.list()?.is_empty() => Some(d),
        Some(_) => return Err(RestoreError::TargetNotMaildir(target.root.clone())),
        None => None,
    };
    let owner = owner_for(existing.as_ref(), &manifest, &snap)?;
    let target_md = match &existing {
        Some(d) if folders::is_maildir(d)? => Some(Maildir::open(target)?),
        _ => None,
    };
    let full = match &target_md {
        Some(md) => !has_mail(md)?,
        None => true,
    };
    let report = RestoreReport { mode: if full { "full" } else { "merge" }.to_string(), ..Default::default() };
    if req.dry_run {
        return dry_run(target_md.as_ref(), &by_folder, report);
    }

    let root = match existing {
        Some(d) => d,
        None => Dir::open_or_create(&target.root, 0o700, owner)?.0,
    };
    let targets = Targets { loc: target.clone(), root, layout: target.layout, control: std::cell::OnceCell::new() };
    let mut session = Session { snap: &snap, messages: MessageDirs::new(&snap)?, owner, req, report, delivered: Delivered::default() };
    for (f, rel, msgs) in by_folder.values() {
        restore_folder(&mut session, &targets, f, rel, msgs, full)?;
    }
    if full {
        restore_user_files(&snap, targets.control_root(owner)?, owner)?;
    }
    Ok(session.report)
}

/// The selected messages by snapshot folder, with the folder's path in the target.
type ByFolder<'m> = BTreeMap<&'m str, (&'m FolderRecord, PathBuf, Vec<&'m MessageRecord>)>;

fn group_by_target_folder<'m>(selected: &[Selected<'m>], from: Layout, to: Layout) -> Result<ByFolder<'m>, RestoreError> {
    let mut by_folder: ByFolder = BTreeMap::new();
    for s in selected {
        if !by_folder.contains_key(s.folder.path.as_str()) {
            let rel = target_rel(s.folder, from, to)?;
            by_folder.insert(s.folder.path.as_str(), (s.folder, rel, Vec::new()));
        }
        by_folder.get_mut(s.folder.path.as_str()).expect("inserted above").2.push(s.msg);
    }
    Ok(by_folder)
}

/// What a restore would do, without doing it.
fn dry_run(target: Option<&Maildir>, by_folder: &ByFolder, mut report: RestoreReport) -> Result<RestoreReport, RestoreError> {
    for (f, rel, msgs) in by_folder.values() {
        let present = match target {
            Some(md) => Present::of(md.root.sub_opt(rel)?.as_ref())?,
            None => Present::default(),
        };
        for m in msgs {
            if present.has(m) {
                report.skip(&f.name, &m.unique);
            } else {
                report.restore(&f.name, &format!("{} flags {:?}", m.unique, m.flags));
            }
        }
    }
    Ok(report)
}

/// Restores one snapshot folder into the target folder at `rel`: in full (same UIDs) if the
/// restore is full and the target never gave out UIDs under another UIDVALIDITY, else merged.
fn restore_folder(s: &mut Session, targets: &Targets, f: &FolderRecord, rel: &Path, msgs: &[&MessageRecord], full: bool) -> Result<(), RestoreError> {
    let tf = Folder::at(&targets.loc, rel.to_path_buf());
    let (dirs, created) = ensure_folder(targets, &tf, s.owner)?;
    if created {
        s.report.folders_created += 1;
    }
    let snap_dir = s.snap.sub(&f.path)?;
    // Putting an older UIDVALIDITY back could hand out UIDs clients already saw.
    let snap_v = uidlist::Reader::open(&snap_dir)?.and_then(|u| u.header.uid_validity);
    let keeps_uids = match uidlist::Reader::open(&dirs.control) {
        Ok(Some(old)) => old.header.uid_validity == snap_v,
        Ok(None) => true,
        Err(_) => false,
    };
    if full && !keeps_uids {
        s.report.warnings.push(format!(
            "{}: the target's UIDVALIDITY differs from the snapshot's; merged with new UIDs instead of keeping the old ones",
            f.name
        ));
    }
    if full && keeps_uids {
        restore_folder_full(s, &snap_dir, &dirs, msgs)
    } else {
        restore_folder_merge(s, &snap_dir, &dirs, msgs)
    }
}

/// Every selected file must be a regular file of the size and checksum the manifest says
/// (the size alone where it recorded no checksum). A file under several names is read once.
fn check_selected(snap: &Dir, selected: &[Selected]) -> Result<(), RestoreError> {
    let mut bad = Vec::new();
    let mut hashed: HashMap<(u64, u64), (u64, String)> = HashMap::new();
    let messages = MessageDirs::new(snap)?;
    for s in selected {
        let rel = s.msg.rel_path();
        let measured = messages.open_message(&s.msg.folder, s.msg.dir, &s.msg.name).map_err(|e| e.to_string()).and_then(|mut f| {
            let Some(want) = s.msg.checksum() else { return Ok(f.meta.size() == s.msg.size) };
            let id = (f.meta.dev(), f.meta.ino());
            let (size, sum) = match hashed.get(&id) {
                Some(known) => known.clone(),
                None => {
                    let sum = fsx::hash_file(&mut f).map_err(|e| e.to_string())?;
                    hashed.insert(id, sum.clone());
                    sum
                }
            };
            Ok(size == s.msg.size && sum == want)
        });
        match measured {
            Ok(true) => {}
            Ok(false) => bad.push(format!("{}: content differs from the manifest", fsx::shown(&snap.show(&rel)))),
            Err(e) => bad.push(e),
        }
    }
    if bad.is_empty() { Ok(()) } else { Err(RestoreError::Corrupt(bad)) }
}

/// Per-user files (subscriptions, dovecot-uidvalidity), only where the target has none.
fn restore_user_files(snap: &Dir, control_root: &Dir, owner: Option<Owner>) -> Result<(), RestoreError> {
    for e in snap.list()? {
        let Some(name) = e.name.to_str().filter(|n| is_user_control_file(n)) else { continue };
        let mut src = match snap.open_read(name) {
            Ok(f) if f.meta.size() <= crate::maildir::CONTROL_FILE_LIMIT => f,
            _ => continue, // not a regular file, or too big: nothing Dovecot wrote
        };
        let out = match control_root.create(name, 0o600) {
            Ok(f) => f,
            Err(e) if e.errno() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        };
        if fsx::copy_file(&mut src, &out, owner).is_err() {
            let _ = control_root.unlink(name);
        }
    }
    Ok(())
}

/// What a target folder already holds: its unique names, and its files by size, so that a
/// message an earlier restore delivered under a fresh name (see `fresh_unique`) is recognised
/// by its content and not delivered a second time.
#[derive(Default)]
struct Present {
    uniques: HashSet<String>,
    /// size -> (directory, name) of files of that size
    by_size: HashMap<u64, Vec<(usize, String)>>,
    dirs: Vec<Dir>,
    /// Checksums already computed: each of the target's files is read at most once.
    sums: std::cell::RefCell<HashMap<(usize, String), Option<String>>>,
}

impl Present {
    /// What the folder `folder` (None: not there) holds.
    fn of(folder: Option<&Dir>) -> Result<Present, RestoreError> {
        let Some(folder) = folder else { return Ok(Present::default()) };
        let subs: Vec<Dir> = Subdir::ALL.iter().filter_map(|s| folder.sub_opt(s.as_str()).transpose()).collect::<Result<_, _>>()?;
        Present::of_subdirs(subs)
    }

    /// What the opened cur/ and new/ of a folder hold.
    fn of_subdirs(dirs: Vec<Dir>) -> Result<Present, RestoreError> {
        let mut p = Present { dirs, ..Default::default() };
        for (i, d) in p.dirs.iter().enumerate() {
            for e in d.list()? {
                let Some(name) = e.name.to_str() else { continue };
                let Some(n) = MessageName::parse(name).filter(|_| e.kind == Kind::File) else { continue };
                p.uniques.insert(n.unique().to_string());
                if let Ok(Some(md)) = d.lstat(name) {
                    p.by_size.entry(md.size()).or_default().push((i, name.to_string()));
                }
            }
        }
        Ok(p)
    }

    fn has(&self, m: &MessageRecord) -> bool {
        self.uniques.contains(&m.unique)
            || m.checksum().is_some_and(|want| {
                self.by_size.get(&m.size).is_some_and(|files| files.iter().any(|(d, name)| self.sum(*d, name).is_some_and(|s| s == want)))
            })
    }

    fn sum(&self, d: usize, name: &str) -> Option<String> {
        let key = (d, name.to_string());
        if let Some(s) = self.sums.borrow().get(&key) {
            return s.clone();
        }
        let s = self.dirs[d].open_read(name).ok().and_then(|mut f| fsx::hash_file(&mut f).ok()).map(|(_, s)| s);
        self.sums.borrow_mut().insert(key, s.clone());
        s
    }
}

/// Full restore of one folder: same names, same uidlist and keywords, under the lock.
fn restore_folder_full(s: &mut Session, snap_dir: &Dir, tf: &TargetFolder, msgs: &[&MessageRecord]) -> Result<(), RestoreError> {
    let mut tmp = TmpFiles { tmp: &tf.tmp, names: Vec::new() };
    let mut staged = Vec::new();
    for m in msgs {
        staged.push((s.deliver(m, &mut tmp)?, *m));
    }
    let lock = DotLock::acquire_in(&tf.control, UIDLIST, &s.req.lock)?;
    for (name, m) in staged {
        match tf.tmp.rename(&name, tf.sub(m.dir), &m.name, Replace::Never) {
            Ok(()) => s.report.restore(&tf.name, &m.name),
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                tf.tmp.unlink(&name)?;
                s.report.skip(&tf.name, &m.unique);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(src) = uidlist::Reader::open(snap_dir)? {
        // Never move the UID counter backwards within the same UIDVALIDITY.
        let mut header = src.header.line.clone();
        if let Ok(Some(old)) = uidlist::Reader::open(&tf.control) {
            if old.header.uid_validity == src.header.uid_validity && old.header.next_uid > src.header.next_uid {
                header = src.header.with_next_uid(old.header.next_uid.unwrap_or(0));
            }
        }
        let mode = snap_dir.lstat(UIDLIST)?.map_or(0o600, |m| m.mode());
        let mut rest = src.into_rest();
        tf.control.replace_file(UIDLIST, mode, s.owner, |f| {
            f.write_all(header.as_bytes())?;
            f.write_all(b"\n")?;
            io::copy(&mut rest, f).map(|_| ())
        })?;
    }
    if let Some(bytes) = snap_dir.read_small(KEYWORDS_FILE, crate::maildir::CONTROL_FILE_LIMIT, "a dovecot-keywords")? {
        let mode = snap_dir.lstat(KEYWORDS_FILE)?.map_or(0o600, |m| m.mode());
        tf.control.replace_file(KEYWORDS_FILE, mode, s.owner, |f| f.write_all(&bytes))?;
    }
    s.release(lock)
}

/// Merge into a live folder: skip what is there, deliver the rest with new UIDs to come.
fn restore_folder_merge(s: &mut Session, snap_dir: &Dir, tf: &TargetFolder, msgs: &[&MessageRecord]) -> Result<(), RestoreError> {
    let snap_kw = Keywords::read(snap_dir)?;
    let already = Present::of_subdirs(tf.subdirs()?)?;
    let mut tmp = TmpFiles { tmp: &tf.tmp, names: Vec::new() };
    let mut staged = Vec::new();
    for m in msgs {
        if already.has(m) {
            s.report.skip(&tf.name, &m.unique);
            continue;
        }
        staged.push((s.deliver(m, &mut tmp)?, *m));
    }
    let lock = DotLock::acquire_in(&tf.control, UIDLIST, &s.req.lock)?;
    let kw_old = tf.control.lstat(KEYWORDS_FILE)?;
    let mut target_kw = Keywords::read(&tf.control)?;
    let kw_before = target_kw.clone();
    let present = Present::of_subdirs(tf.subdirs()?)?;
    let mut known = HashSet::new();
    if let Some(u) = uidlist::Reader::open(&tf.control)? {
        for e in u {
            known.insert(e?.unique);
        }
    }
    for (tmp_name, m) in staged {
        if present.has(m) {
            tf.tmp.unlink(&tmp_name)?;
            s.report.skip(&tf.name, &m.unique);
            continue;
        }
        let flags = remap_flags(&m.flags, &snap_kw, &mut target_kw, |c| {
            s.report.warnings.push(format!("{}/{}: keyword letter {c} dropped (unknown or no free letter)", tf.name, m.unique))
        });
        // A unique name the target's uidlist still remembers would get its old UID back.
        let unique = if known.contains(&m.unique) { fresh_unique(&m.unique) } else { m.unique.clone() };
        let name = crate::maildir::filename::with_flags(&unique, &flags);
        tf.tmp.rename(&tmp_name, &tf.cur, &name, Replace::Never)?;
        s.report.restore(&tf.name, &name);
    }
    if target_kw != kw_before {
        // Dovecot re-reads dovecot-keywords only when its mtime, in whole seconds, differs from
        // what it last read (and makes it grow on each of its own rewrites): a rewrite within
        // the same second would go unnoticed, and a running session would write "unknown-N"
        // back over our new letters.
        let mode = kw_old.filter(|m| m.is_file()).map_or(0o600, |m| m.mode());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let mtime = kw_old.map_or(now, |m| now.max(m.mtime() + 1));
        target_kw.write(&tf.control, mode, s.owner, mtime)?;
    }
    s.release(lock)
}

/// `flags` with the snapshot's keyword letters (`from`) turned into the target's (`to`, which
/// gains letters as needed); `dropped` hears of each keyword that cannot be had.
fn remap_flags(flags: &str, from: &Keywords, to: &mut Keywords, mut dropped: impl FnMut(char)) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in flags.chars() {
        if !c.is_ascii_lowercase() {
            out.push(c);
            continue;
        }
        match from.name_of(c).and_then(|name| to.letter_for(name)) {
            Some(l) => out.push(l),
            None => dropped(c),
        }
    }
    out.sort_unstable();
    out.dedup();
    out.into_iter().collect()
}

#[cfg(test)]
mod tests;
