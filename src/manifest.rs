//! The manifest inside every backup: zstd-compressed (plain before: both are read), one JSON
//! record per line — a header, one record per
//! folder (with its uidlist header) and one per message (folder, unique name, flags, size,
//! BLAKE3 checksum). `verify` checks a backup against it; snapshots use it to find messages
//! they can hard-link instead of copying; `restore` uses it to know what to put back.
//!
//! A manifest is untrusted input (a snapshot may have passed through other hands): reading
//! one checks every line's length, every folder path and file name for being a safe name in
//! the snapshot, and every count, before anything uses it.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsx::{self, Dir, DirStamp, FsError, Owner};
use crate::maildir::{Layout, MessageName, Subdir, MESSAGE_DIRS};

pub const MANIFEST_NAME: &str = "maildir-backup.manifest";
/// A manifest is written zstd-compressed (its JSON lines shrink about tenfold); one that does
/// not start with zstd's magic number is read as the plain lines of earlier versions.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const ZSTD_LEVEL: i32 = 3;
const ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// 128 KiB: what writing asks of a reader since.
const ZSTD_WINDOW_LOG: u32 = 17;
/// A plain backup's manifest, with every message record in it.
pub const FORMAT: u32 = 1;
/// A repository snapshot's: folders whose message records are in the series' store (see
/// [`crate::store`]).
pub const FORMAT_STORE: u32 = 2;
/// Longest line accepted: a folder record lists the expunged unique names its uidlist still
/// holds, normally none or a few.
const LINE_LIMIT: u64 = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    pub tool: String,
    /// The source as a Dovecot 2.3 mail_location string.
    pub source: String,
    pub layout: Layout,
    /// Unix time of the reconcile instant: the backup equals the mail at that moment.
    pub taken_at: i64,
    pub lock_hold_ms: u64,
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Bytes read from the source; the rest were hard-linked from the previous snapshot.
    #[serde(default)]
    pub bytes_copied: u64,
    /// The owner of the source Maildir when root made the backup (whose mail it is: a
    /// restore into a new Maildir gives it back to them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FolderRecord {
    /// Directory relative to the backup root ("" for INBOX).
    pub path: String,
    pub name: String,
    /// First line of the folder's dovecot-uidlist at the reconcile instant.
    pub uidlist_header: Option<String>,
    /// Unique names the uidlist still lists but that had no file at the reconcile instant:
    /// messages Dovecot expunged and has not yet dropped from its uidlist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uidlist_expunged: Vec<String>,
    /// The uidlist named more expunged messages than a record holds (`EXPUNGED_LIMIT`): the
    /// list is cut short, and verify does not hold the uidlist's other lines against the files.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uidlist_expunged_partial: bool,
    pub messages: u64,
    /// The store entry holding this folder's `cur/`, `new/` and message records (a repository
    /// snapshot's folders), which then are not in the manifest itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The size of the folder's messages, for a stored folder (whose records are elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The source's `cur/` and `new/` as they were when the folder was listed: a later
    /// snapshot takes the stored folder over whole if they have not changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_dirs: Option<SourceDirs>,
}

impl FolderRecord {
    /// A folder with no messages and no uidlist, at `path`, named `name`.
    pub fn new(path: String, name: String) -> FolderRecord {
        FolderRecord { path, name, uidlist_header: None, uidlist_expunged: Vec::new(), uidlist_expunged_partial: false, messages: 0, store: None, bytes: None, source_dirs: None }
    }
}

/// The stamps of a source folder's `cur/` and `new/`, and when they were listed (Unix time in
/// nanoseconds).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceDirs {
    pub cur: DirStamp,
    pub new: DirStamp,
    pub listed_at_ns: i64,
}

impl SourceDirs {
    /// Whether a folder whose directories have the stamps `now` is provably as it was listed:
    /// the same stamps, which were already settled when listed.
    pub fn unchanged(&self, now: [Option<DirStamp>; 2]) -> bool {
        now == [Some(self.cur), Some(self.new)] && now.iter().flatten().all(|s| s.settled_before(self.listed_at_ns.into()))
    }
}

/// Bytes of expunged unique names a folder record lists at most (well inside `LINE_LIMIT`).
pub const EXPUNGED_LIMIT: usize = 4 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRecord {
    pub folder: String,
    pub dir: Subdir,
    pub name: String,
    pub unique: String,
    pub flags: String,
    pub size: u64,
    /// Empty in a link snapshot made without `--checksum`: see [`MessageRecord::checksum`].
    pub blake3: String,
}

impl MessageRecord {
    /// The file's path in the backup.
    pub fn rel_path(&self) -> std::path::PathBuf {
        Path::new(&self.folder).join(self.dir.as_str()).join(&self.name)
    }

    /// The BLAKE3 recorded for the message; None in a link snapshot made without checksums,
    /// where its size is all there is to check.
    pub fn checksum(&self) -> Option<&str> {
        Some(self.blake3.as_str()).filter(|s| !s.is_empty())
    }

    /// That checksum as its 32 bytes (None also if it is not valid hex).
    pub fn checksum_bytes(&self) -> Option<[u8; 32]> {
        self.checksum().and_then(|h| blake3::Hash::from_hex(h).ok()).map(|h| *h.as_bytes())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Record {
    Backup(Header),
    Folder(FolderRecord),
    Message(MessageRecord),
}

/// A record as written: borrowed, so writing one copies nothing.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RecordRef<'a> {
    Backup(&'a Header),
    Folder(&'a FolderRecord),
    Message(&'a MessageRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: Header,
    pub folders: Vec<FolderRecord>,
    pub messages: Vec<MessageRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: line {line}: {what}")]
    Bad { path: String, line: usize, what: String },
}

impl ManifestError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ManifestError::Fs(e) => e.exit_code(),
            ManifestError::Bad { .. } => crate::sysexits::EX_DATAERR,
        }
    }
}

impl Manifest {
    /// Writes the manifest as a new file (0600, like the mail it describes) in `dir`, flushed.
    /// It is first checked as `read` will check it: a backup is never written that its own
    /// restore would refuse.
    pub fn write(&self, dir: &Dir) -> Result<(), ManifestError> {
        self.check_records().map_err(|what| ManifestError::Bad { path: format!("{} (being written)", dir.show(MANIFEST_NAME).display()), line: 0, what })?;
        let mut w = ManifestWriter::create(dir, &self.header)?;
        self.folders.iter().try_for_each(|f| w.folder(f))?;
        self.messages.iter().try_for_each(|m| w.message(m))?;
        w.finish()
    }

    /// Reads and checks the manifest of the backup in `dir`: each record as `visit` does, and
    /// every name's uniqueness and every folder's count.
    pub fn read(dir: &Dir) -> Result<Manifest, ManifestError> {
        let (mut folders, mut messages) = (Vec::new(), Vec::new());
        let header = Manifest::visit(dir, |f| folders.push(f), |m| messages.push(m))?;
        let manifest = Manifest { header, folders, messages };
        let path = dir.show(MANIFEST_NAME).display().to_string();
        manifest.check_counts().map_err(|what| ManifestError::Bad { path, line: 1, what })?;
        Ok(manifest)
    }

    /// Reads the header and the folder records, checked as `read` checks them; the message
    /// records are passed over, not kept.
    pub fn read_folders(dir: &Dir) -> Result<(Header, Vec<FolderRecord>), ManifestError> {
        let mut folders = Vec::new();
        let header = Manifest::visit(dir, |f| folders.push(f), |_| {})?;
        Ok((header, folders))
    }

    /// Reads the manifest in `dir` record by record, each checked as `read` checks it, handing
    /// each folder and message to its callback as it comes, and the header's counts checked
    /// against the records at the end (but not, unlike `read`, each name's uniqueness: that
    /// would keep them all).
    pub fn visit(dir: &Dir, folder: impl FnMut(FolderRecord), mut message: impl FnMut(MessageRecord)) -> Result<Header, ManifestError> {
        Manifest::visit_parts(dir, folder, &mut message, true)
    }

    /// As `visit`, without the records of stored folders: the header's counts are checked
    /// against what their folder records say, for a caller that reads (and counts) each
    /// folder's store entry itself.
    pub fn visit_unstored(dir: &Dir, folder: impl FnMut(FolderRecord), mut message: impl FnMut(MessageRecord)) -> Result<Header, ManifestError> {
        Manifest::visit_parts(dir, folder, &mut message, false)
    }

    fn visit_parts(dir: &Dir, mut folder: impl FnMut(FolderRecord), message: &mut dyn FnMut(MessageRecord), read_parts: bool) -> Result<Header, ManifestError> {
        let mut lines = Lines::open(dir, MANIFEST_NAME)?;
        let header = lines.header()?;
        let (mut folders, mut messages, mut bytes) = (0u64, 0u64, Some(0u64));
        let mut stored: Vec<(String, String, u64, u64)> = Vec::new();
        let mut stored_paths = HashSet::new();
        while let Some(line) = lines.next_line()? {
            match lines.parse(&line)? {
                Record::Backup(_) => return Err(lines.bad("a second header")),
                Record::Folder(f) => {
                    check_folder(&f, header.layout).map_err(|w| lines.bad(&w))?;
                    if let Some(id) = &f.store {
                        if header.format != FORMAT_STORE {
                            return Err(lines.bad("a stored folder in a manifest of a plain backup"));
                        }
                        stored.push((f.path.clone(), id.clone(), f.messages, f.bytes.unwrap_or(0)));
                        stored_paths.insert(f.path.clone());
                    }
                    folders += 1;
                    folder(f);
                }
                Record::Message(m) => {
                    check_message(&m).map_err(|w| lines.bad(&w))?;
                    if stored_paths.contains(&m.folder) {
                        return Err(lines.bad(&format!("message {:?} is in folder {:?}, whose messages are in the store", m.name, m.folder)));
                    }
                    (messages, bytes) = (messages + 1, bytes.and_then(|b| b.checked_add(m.size)));
                    message(m);
                }
            }
        }
        if !read_parts {
            for (_, _, said, said_bytes) in stored {
                (messages, bytes) = (messages + said, bytes.and_then(|x| x.checked_add(said_bytes)));
            }
        } else if !stored.is_empty() {
            let series = dir.parent()?;
            for (path, id, said, said_bytes) in stored {
                let (n, b) = part::visit(&series, Some(&path), &id, message)?;
                if (n, b) != (said, said_bytes) {
                    return Err(ManifestError::Bad { path: lines.path.clone(), line: 1, what: format!("folder {path:?} says {said} messages and {said_bytes} bytes, its store entry {id} holds {n} and {b}") });
                }
                (messages, bytes) = (messages + n, bytes.and_then(|x| x.checked_add(b)));
            }
        }
        let counted = |what: String| ManifestError::Bad { path: lines.path.clone(), line: 1, what };
        let bytes = bytes.ok_or_else(|| counted("message sizes overflow".into()))?;
        if (folders, messages, bytes) != (header.folders, header.messages, header.bytes) {
            return Err(counted(format!("the header counts {} folders, {} messages and {} bytes, the records {folders}, {messages} and {bytes}", header.folders, header.messages, header.bytes)));
        }
        Ok(header)
    }

    /// Hands each message record of the store entry `id` of `series` to `message`, checked.
    pub fn visit_stored(series: &Dir, id: &str, mut message: impl FnMut(MessageRecord)) -> Result<(), ManifestError> {
        part::visit(series, None, id, &mut message).map(drop)
    }

    /// Reads only the header (for listings).
    pub fn read_header(dir: &Dir) -> Result<Header, ManifestError> {
        Lines::open(dir, MANIFEST_NAME)?.header()
    }

    /// Reads the header and the folder records, each checked, and nothing after them: what a
    /// snapshot needs of the one before it.
    pub fn read_folders_only(dir: &Dir) -> Result<(Header, Vec<FolderRecord>), ManifestError> {
        let mut lines = Lines::open(dir, MANIFEST_NAME)?;
        let header = lines.header()?;
        let mut folders = Vec::new();
        while let Some(line) = lines.next_line()? {
            match lines.parse(&line)? {
                Record::Folder(f) => {
                    check_folder(&f, header.layout).map_err(|w| lines.bad(&w))?;
                    folders.push(f);
                }
                Record::Message(_) => break,
                Record::Backup(_) => return Err(lines.bad("a second header")),
            }
        }
        Ok((header, folders))
    }

    /// Every record as `read` checks it, and the counts.
    fn check_records(&self) -> Result<(), String> {
        self.folders.iter().try_for_each(|f| check_folder(f, self.header.layout))?;
        self.messages.iter().try_for_each(check_message)?;
        self.check_counts()
    }

    /// The header's counts and sums agree with the records; every message is in a folder
    /// that has a record, once.
    fn check_counts(&self) -> Result<(), String> {
        let h = &self.header;
        if h.folders != self.folders.len() as u64 || h.messages != self.messages.len() as u64 {
            return Err(format!(
                "the header counts {} folders and {} messages, the records {} and {}",
                h.folders,
                h.messages,
                self.folders.len(),
                self.messages.len()
            ));
        }
        let bytes = self.messages.iter().try_fold(0u64, |sum, m| sum.checked_add(m.size)).ok_or("message sizes overflow")?;
        if bytes != h.bytes {
            return Err(format!("the header counts {} bytes, the records {bytes}", h.bytes));
        }
        let mut per_folder: HashMap<&str, u64> = HashMap::new();
        for f in &self.folders {
            if per_folder.insert(f.path.as_str(), 0).is_some() {
                return Err(format!("folder {:?} is listed twice", f.path));
            }
        }
        let mut seen = HashSet::new();
        for m in &self.messages {
            *per_folder.get_mut(m.folder.as_str()).ok_or_else(|| format!("message {:?} is in folder {:?}, which has no record", m.name, m.folder))? += 1;
            if !seen.insert((m.folder.as_str(), m.dir, m.name.as_str())) {
                return Err(format!("message {:?} in folder {:?} is listed twice", m.name, m.folder));
            }
        }
        for f in &self.folders {
            if per_folder[f.path.as_str()] != f.messages {
                return Err(format!("folder {:?} says {} messages, the records {}", f.path, f.messages, per_folder[f.path.as_str()]));
            }
        }
        Ok(())
    }
}

/// Writes a manifest record by record, so a backup never holds all of them at once: the header
/// (with the counts the records must add up to), then the folders, then the messages of the
/// folders not in the store. Each record is checked as `read` checks it, and the counts at
/// `finish`.
pub struct ManifestWriter {
    out: Compressed,
    header: Header,
    /// Folder path → (messages its record says, messages written or stored).
    folders: HashMap<String, (u64, u64)>,
    stored: HashSet<String>,
    messages: u64,
    bytes: u64,
}

impl ManifestWriter {
    /// Starts a new manifest file (0600) in `dir`, with its header.
    pub fn create(dir: &Dir, header: &Header) -> Result<ManifestWriter, ManifestError> {
        let mut out = Compressed::create(dir, MANIFEST_NAME)?;
        out.put(&RecordRef::Backup(header))?;
        Ok(ManifestWriter { out, header: header.clone(), folders: HashMap::new(), stored: HashSet::new(), messages: 0, bytes: 0 })
    }

    /// A folder's record; a stored folder's messages (in its store entry) are counted with it.
    pub fn folder(&mut self, f: &FolderRecord) -> Result<(), ManifestError> {
        check_folder(f, self.header.layout).map_err(|w| self.bad(w))?;
        let done = if f.store.is_some() {
            if self.header.format != FORMAT_STORE {
                return Err(self.bad(format!("folder {:?} is stored, in a manifest of a plain backup", f.path)));
            }
            self.stored.insert(f.path.clone());
            self.messages += f.messages;
            self.bytes = self.bytes.checked_add(f.bytes.unwrap_or(0)).ok_or_else(|| self.bad("message sizes overflow".into()))?;
            f.messages
        } else {
            0
        };
        if self.folders.insert(f.path.clone(), (f.messages, done)).is_some() {
            return Err(self.bad(format!("folder {:?} is listed twice", f.path)));
        }
        self.out.put(&RecordRef::Folder(f))
    }

    pub fn message(&mut self, m: &MessageRecord) -> Result<(), ManifestError> {
        check_message(m).map_err(|w| self.bad(w))?;
        if self.stored.contains(&m.folder) {
            return Err(self.bad(format!("message {:?} is in folder {:?}, whose messages are in the store", m.name, m.folder)));
        }
        let Some(count) = self.folders.get_mut(&m.folder) else {
            return Err(self.bad(format!("message {:?} is in folder {:?}, which has no record", m.name, m.folder)));
        };
        count.1 += 1;
        self.messages += 1;
        self.bytes = self.bytes.checked_add(m.size).ok_or_else(|| self.bad("message sizes overflow".into()))?;
        self.out.put(&RecordRef::Message(m))
    }

    /// Checks the counts, flushes and fsyncs the file.
    pub fn finish(self) -> Result<(), ManifestError> {
        let h = &self.header;
        if (self.folders.len() as u64, self.messages, self.bytes) != (h.folders, h.messages, h.bytes) {
            return Err(self.bad(format!("the header counts {} folders, {} messages and {} bytes, the records {}, {} and {}", h.folders, h.messages, h.bytes, self.folders.len(), self.messages, self.bytes)));
        }
        if let Some((path, (said, got))) = self.folders.iter().find(|(_, (said, got))| said != got) {
            return Err(self.bad(format!("folder {path:?} says {said} messages, the records {got}")));
        }
        self.out.finish()
    }

    fn bad(&self, what: String) -> ManifestError {
        self.out.bad(what)
    }
}

/// A new file of zstd-compressed JSON lines.
struct Compressed {
    w: zstd::Encoder<'static, BufWriter<std::fs::File>>,
    path: std::path::PathBuf,
}

impl Compressed {
    fn create(dir: &Dir, name: &str) -> Result<Compressed, ManifestError> {
        let path = dir.show(name);
        let file = BufWriter::new(dir.create(name, 0o600)?);
        let err = |e| ManifestError::Fs(FsError::Io { op: "compress", path: path.clone(), source: e });
        let mut w = zstd::Encoder::new(file, ZSTD_LEVEL).map_err(err)?;
        // A small window: its reader needs as much memory, and records repeat only nearby.
        w.window_log(ZSTD_WINDOW_LOG).map_err(err)?;
        Ok(Compressed { w, path })
    }

    fn put(&mut self, r: &impl Serialize) -> Result<(), ManifestError> {
        let w = &mut self.w;
        let written = serde_json::to_writer(&mut *w, r).map_err(io::Error::other).and_then(|_| w.write_all(b"\n"));
        written.map_err(|e| ManifestError::Fs(FsError::Io { op: "write", path: self.path.clone(), source: e }))
    }

    /// Flushes and fsyncs the file.
    fn finish(self) -> Result<(), ManifestError> {
        let io_err = |op, path: std::path::PathBuf, e| ManifestError::Fs(FsError::Io { op, path, source: e });
        let path = self.path;
        let buffered = self.w.finish().map_err(|e| io_err("write", path.clone(), e))?;
        let file = buffered.into_inner().map_err(|e| io_err("write", path.clone(), e.into_error()))?;
        file.sync_all().map_err(|e| io_err("fsync", path, e))
    }

    fn bad(&self, what: String) -> ManifestError {
        ManifestError::Bad { path: format!("{} (being written)", self.path.display()), line: 0, what }
    }
}

/// A folder path is a folder's directory in the backup: "" (INBOX), `.Name` under Maildir++,
/// `Name/Sub` under LAYOUT=fs; never anything that climbs out or is a message directory.
pub fn check_folder_path(path: &str, layout: Layout) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    fsx::check_rel(Path::new(path)).map_err(|w| format!("folder path {path:?}: {w}"))?;
    if fsx::has_control(path) {
        return Err(format!("folder path {path:?}: control characters"));
    }
    if layout == Layout::MaildirPlusPlus && (!path.starts_with('.') || path.contains('/')) {
        return Err(format!("folder path {path:?}: not a Maildir++ folder (.Name)"));
    }
    if path.split('/').any(|c| MESSAGE_DIRS.contains(&c)) {
        return Err(format!("folder path {path:?}: cur, new and tmp are not folders"));
    }
    Ok(())
}

fn check_folder(f: &FolderRecord, layout: Layout) -> Result<(), String> {
    check_folder_path(&f.path, layout)?;
    if f.name.is_empty() || fsx::has_control(&f.name) || f.name.len() > 4096 {
        return Err(format!("folder name {:?} is not usable", f.name));
    }
    Ok(())
}

fn check_message(m: &MessageRecord) -> Result<(), String> {
    let name = MessageName::parse(&m.name).filter(MessageName::is_safe).ok_or_else(|| format!("message file name {:?} is not usable", m.name))?;
    if name.unique() != m.unique || name.flags() != m.flags {
        return Err(format!("message {:?}: unique name or flags do not match the file name", m.name));
    }
    if m.checksum().is_some_and(|s| s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(format!("message {:?}: checksum {:?} is not a BLAKE3 hex digest", m.name, m.blake3));
    }
    // The folder path itself is checked with its folder record (every message needs one).
    fsx::check_rel(Path::new(&m.folder)).map_err(|w| format!("message {:?}: folder {:?}: {w}", m.name, m.folder))?;
    Ok(())
}

/// A message line, read as a plain struct: most lines are messages, and reading a line as the
/// tagged `Record` first buffers all of its fields (about twice the work). The fields are
/// `MessageRecord`'s (serde's `flatten` would buffer them too).
#[derive(Deserialize)]
struct MessageLine {
    #[allow(dead_code)] // only its one value is accepted
    kind: MessageKind,
    folder: String,
    dir: Subdir,
    name: String,
    unique: String,
    flags: String,
    size: u64,
    blake3: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum MessageKind {
    Message,
}

/// The message record `line` holds, if it holds one; None for any other line (read as a
/// `Record` then, whose errors say what is wrong).
fn fast_message(line: &[u8]) -> Option<MessageRecord> {
    let MessageLine { kind: _, folder, dir, name, unique, flags, size, blake3 } = serde_json::from_slice(line).ok()?;
    Some(MessageRecord { folder, dir, name, unique, flags, size, blake3 })
}

/// The manifest's lines, each bounded.
struct Lines {
    input: BufReader<std::io::Take<Box<dyn Read>>>,
    path: String,
    line: usize,
}

impl Lines {
    /// Opens the manifest (or part) `name` in `dir`, compressed (as written since zstd) or
    /// plain (as before).
    fn open(dir: &Dir, name: &str) -> Result<Lines, ManifestError> {
        let f = dir.open_read(name)?;
        let path = f.path.display().to_string();
        let io_err = |e| ManifestError::Fs(FsError::Io { op: "read", path: f.path.clone(), source: e });
        let mut file = BufReader::new(f.file);
        let compressed = file.fill_buf().map_err(io_err)?.starts_with(&ZSTD_MAGIC);
        let raw: Box<dyn Read> = if compressed {
            let mut d = zstd::Decoder::with_buffer(file).map_err(io_err)?;
            // Ours need 128 KiB (2 MiB before); a forged one may not make us allocate more than this.
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(io_err)?;
            Box::new(d)
        } else {
            Box::new(file)
        };
        Ok(Lines { path, input: BufReader::new(raw.take(u64::MAX)), line: 0 })
    }

    fn bad(&self, what: &str) -> ManifestError {
        ManifestError::Bad { path: self.path.clone(), line: self.line, what: what.to_string() }
    }

    /// Lets go of the file and its decompressor (once read to the end), keeping where it was
    /// for `bad`.
    fn close(&mut self) {
        let nothing: Box<dyn Read> = Box::new(io::empty());
        self.input = BufReader::with_capacity(0, nothing.take(0));
    }

    /// The next non-empty line; None at the end.
    fn next_line(&mut self) -> Result<Option<Vec<u8>>, ManifestError> {
        loop {
            self.line += 1;
            let mut buf = Vec::new();
            self.input.get_mut().set_limit(LINE_LIMIT + 1);
            let n = self.input.read_until(b'\n', &mut buf).map_err(|e| FsError::Io { op: "read", path: self.path.clone().into(), source: e })?;
            if n == 0 {
                return Ok(None);
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            } else if n as u64 > LINE_LIMIT {
                return Err(self.bad(&format!("line longer than {LINE_LIMIT} bytes")));
            }
            if !buf.is_empty() {
                return Ok(Some(buf));
            }
        }
    }

    fn parse(&self, line: &[u8]) -> Result<Record, ManifestError> {
        match fast_message(line) {
            Some(m) => Ok(Record::Message(m)),
            None => self.parse_as(line),
        }
    }

    fn parse_as<T: serde::de::DeserializeOwned>(&self, line: &[u8]) -> Result<T, ManifestError> {
        serde_json::from_slice(line).map_err(|e| self.bad(&e.to_string()))
    }

    fn header(&mut self) -> Result<Header, ManifestError> {
        let line = self.next_line()?.ok_or_else(|| self.bad("no backup header"))?;
        let Record::Backup(h) = self.parse(&line)? else { return Err(self.bad("no backup header")) };
        if h.format != FORMAT && h.format != FORMAT_STORE {
            return Err(self.bad(&format!("manifest format {} is neither {FORMAT} nor {FORMAT_STORE}", h.format)));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_paths() {
        for ok in ["", ".Sent", ".A.B"] {
            assert!(check_folder_path(ok, Layout::MaildirPlusPlus).is_ok(), "{ok}");
        }
        for ok in ["", "Archive/2024", "Entw&APw-rfe"] {
            assert!(check_folder_path(ok, Layout::Fs).is_ok(), "{ok}");
        }
        for bad in ["..", "../x", "/etc", ".a/../..", "Sent", ".a/b", "cur", ".x\n"] {
            assert!(check_folder_path(bad, Layout::MaildirPlusPlus).is_err(), "{bad:?}");
        }
        for bad in ["a/../b", "a/cur", "/a", "a//b"] {
            assert!(check_folder_path(bad, Layout::Fs).is_err(), "{bad:?}");
        }
    }
}

pub mod part;
mod unique_names;

#[cfg(test)]
mod hostile_tests;
