//! One synchronisation pass: bring the staged copy of every listed folder in line with a
//! fresh listing of the source. Renames (flag changes, new/ -> cur/) become renames in the
//! copy, messages moved between folders are moved in the copy, only new messages are read.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;

use super::entries::{Entries, Keyed};
pub use super::entries::Entry;
use super::scan::{DirStamp, Listed, Listing};
use super::spill::{Spill, Spilled};
use super::{BackupError, MessageFiles, Progress};
use crate::fsx::{self, Dir, FsError, Replace};
use crate::maildir::{unique_part, Folder, Maildir, MessageName, Subdir, MESSAGE_DIRS};
use crate::manifest::FolderRecord;
use crate::store;

/// Warnings kept for the report; a Maildir full of planted files must not flood the log.
const MAX_WARNINGS: usize = 1000;
/// While the locks are held, a new message is only opened (and its staged file made), and
/// copied once they are let go: a message file never changes, so the file opened under the
/// locks is the message as it was at the instant, and users do not wait for its copy. At most
/// this many (each holds two descriptors); past it, copied at once.
const MAX_DEFERRED: usize = 128;

/// A checksum as `fsx` gives it (hex; empty for none).
fn digest(hex: &str) -> Option<blake3::Hash> {
    blake3::Hash::from_hex(hex).ok()
}

/// The hex form of an entry's checksum (empty for none), as the manifest and the shared
/// copies carry it.
pub fn hex(h: Option<blake3::Hash>) -> String {
    h.map(|h| h.to_hex().to_string()).unwrap_or_default()
}

/// The staged copy of one folder.
#[derive(Debug)]
pub struct FolderState {
    pub folder: Folder,
    /// Empty while the entries are in the scratch file (`spilled`): see `Tree::sorted_entries`.
    pub entries: Entries,
    pub spilled: Option<Spilled>,
    pub stamps: [Option<DirStamp>; 2],
    pub listed_at: Option<SystemTime>,
    /// Taken over whole from the previous snapshot (its record there) instead of listed: the
    /// staged cur/ and new/ are that snapshot's, shared (see `Reuse::take_over`).
    pub taken_over: Option<FolderRecord>,
}

impl FolderState {
    /// How many messages it holds (wherever its entries are).
    pub fn messages(&self) -> u64 {
        self.spilled.map_or(self.entries.len() as u64, |s| s.messages)
    }

    /// The bytes of its messages.
    pub fn bytes(&self) -> u64 {
        self.spilled.map_or_else(|| self.entries.values().map(|e| e.size).sum(), |s| s.bytes)
    }
}

/// Everything staged so far, by folder path.
pub struct Tree {
    /// The staging directory: ours alone (0700), so nothing in it was planted.
    pub staging: Dir,
    pub folders: BTreeMap<PathBuf, FolderState>,
    pub keep_owner: bool,
    warnings: Vec<String>,
    /// Hashes of every warning given, shown or not: each is given once.
    warned: HashSet<u64>,
    /// Warnings past `MAX_WARNINGS`, counted only.
    unshown: u64,
    /// Source files with several links (Dovecot's hard-linked COPY, or an owner's thousand
    /// links to one big file), by (device, inode): the folder and key of their staged copy,
    /// which the other names are hard-linked to, and the file's stamp (an inode number is
    /// reused once the file is gone). A backup never costs more than its source.
    shared: HashMap<(u64, u64), SharedAt>,
    /// Whether new messages are to be deferred (see `MAX_DEFERRED`), and those that were.
    deferring: bool,
    deferred: Vec<Deferred>,
    messages: MessageFiles,
    /// Control files (paths in the staged copy) linked from the previous snapshot, unchanged.
    pub linked_control: Mutex<HashSet<PathBuf>>,
    /// Where folders' entries wait while nothing changes them (None: not made yet, or the
    /// file system cannot make one; see `spill`).
    spill: Option<Spill>,
    spill_tried: bool,
}

/// Where the staged copy of a multiply-linked source file is: its folder and key, and the
/// entry as it was when its folder's entries went to the scratch file (a spilled folder does
/// not change).
struct SharedAt {
    at: (PathBuf, String),
    stamp: Stamp,
    spilled: Option<Entry>,
}

/// A copy left for after the locks: the source as opened under them, and the staged file
/// made for it then (renamed or removed by later passes like any other).
struct Deferred {
    key: String,
    input: fsx::ReadFile,
    out: std::fs::File,
    shown: PathBuf,
    owner: Option<fsx::Owner>,
}

/// Size and modification time: what tells a file from a later one that got its inode number.
type Stamp = (u64, i64, i64);

fn stamp_of(m: &fsx::Meta) -> Stamp {
    (m.size(), m.mtime(), m.mtime_nsec())
}

/// One staged copy of a multiply-linked source file.
#[derive(Clone)]
struct SharedCopy {
    /// Its path in the staging dir.
    path: PathBuf,
    /// The source file's when it was copied.
    stamp: Stamp,
    size: u64,
    blake3: String,
    /// Where the tree records it: folder and key.
    at: (PathBuf, String),
}

/// The multiply-linked source files of one folder's jobs: those staged before, and those
/// being staged now (each by one job; the others wait for it and link to its copy).
struct SharedInodes<'t> {
    tree: &'t Tree,
    slots: Mutex<HashMap<(u64, u64), Slot>>,
    settled: Condvar,
}

enum Slot {
    Copying,
    Done(SharedCopy),
}

impl<'t> SharedInodes<'t> {
    fn new(tree: &'t Tree) -> Self {
        SharedInodes { tree, slots: Mutex::new(HashMap::new()), settled: Condvar::new() }
    }

    /// The staged copy of source inode `id` (as of `stamp`); or None, and then the caller
    /// makes the copy, and settles the claim if it got one.
    fn find_or_claim<'a>(&'a self, id: (u64, u64), stamp: Stamp) -> Result<SharedCopy, Option<Claim<'a, 't>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match slots.get(&id) {
                Some(Slot::Done(c)) if c.stamp == stamp => return Ok(c.clone()),
                Some(Slot::Done(_)) => return Err(None), // another file with a reused inode number
                Some(Slot::Copying) => slots = self.settled.wait(slots).unwrap_or_else(|p| p.into_inner()),
                None => {
                    if let Some(c) = self.staged_before(id).filter(|c| c.stamp == stamp) {
                        return Ok(c);
                    }
                    slots.insert(id, Slot::Copying);
                    return Err(Some(Claim { shared: self, id, done: false }));
                }
            }
        }
    }

    /// Ends a claim: with the copy made, or (None) with nothing, for the next job to try.
    fn settle(&self, id: (u64, u64), copy: Option<SharedCopy>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match copy {
            Some(c) => slots.insert(id, Slot::Done(c)),
            None => slots.remove(&id),
        };
        self.settled.notify_all();
    }

    /// A copy staged in an earlier pass, if still where it was.
    fn staged_before(&self, id: (u64, u64)) -> Option<SharedCopy> {
        let SharedAt { at: (rel, key), stamp, spilled } = self.tree.shared.get(&id)?;
        let state = self.tree.folders.get(rel)?;
        let e = if state.spilled.is_some() { spilled.as_ref()? } else { state.entries.get(key)? };
        let path = staged_path(rel, e.sub, &e.name);
        Some(SharedCopy { path, stamp: *stamp, size: e.size, blake3: hex(e.blake3), at: (rel.clone(), key.clone()) })
    }

    fn into_new(self) -> impl Iterator<Item = ((u64, u64), SharedCopy)> {
        self.slots.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().filter_map(|(id, s)| match s {
            Slot::Done(c) => Some((id, c)),
            Slot::Copying => None,
        })
    }
}

/// A claim on copying a shared inode, released (for another job to try) if not settled.
struct Claim<'a, 't> {
    shared: &'a SharedInodes<'t>,
    id: (u64, u64),
    done: bool,
}

impl Claim<'_, '_> {
    fn settle(mut self, copy: SharedCopy) {
        self.done = true;
        self.shared.settle(self.id, Some(copy));
    }
}

impl Drop for Claim<'_, '_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.settle(self.id, None);
        }
    }
}

/// Finds an existing copy of a message to hard-link instead of reading the source
/// (the previous snapshot of a repository).
pub trait Reuse: Sync {
    /// Hard-links an earlier copy of message `unique`, `size` bytes in the source, into `dst`
    /// as `name`; its BLAKE3 if it did.
    fn link_into(&self, unique: &str, size: u64, dst: &Dir, name: &str) -> Option<String>;

    /// Reads what `link_into` looks messages up in, before the copy tasks that call it start
    /// (they would otherwise all wait for the first to read it).
    fn read_ahead(&self) {}

    /// No message is linked any more: what `link_into` looks them up in may go, before the
    /// records are written.
    fn done_linking(&self) {}

    /// Whether `link_into` answers without reading that first.
    fn ready(&self) -> bool {
        true
    }

    /// Hard-links an earlier copy of the control file at `rel` (in the backup) into `dst` as
    /// `name` if it is the same file as `source` would be copied: the same bytes, mode, owner
    /// and modification time. True if it did; it may have read `source` (the caller rewinds it).
    fn link_control(&self, _rel: &Path, _source: &mut fsx::ReadFile, _owner: Option<fsx::Owner>, _dst: &Dir, _name: &str) -> bool {
        false
    }

    /// The previous snapshot's record of the source folder at `rel` if the folder is provably
    /// as that snapshot copied it (its cur/ and new/ have the stamps `now`), with the store
    /// entry holding that copy.
    fn take_over(&self, _rel: &Path, _now: [Option<DirStamp>; 2]) -> Option<FolderRecord> {
        None
    }

    /// The unique names of the messages of the previous snapshot's stored folder `id`.
    fn stored_uniques(&self, id: &str) -> Result<HashSet<String>, BackupError>;
}

/// Where a repository snapshot keeps its folders' messages (see [`crate::store`]).
pub trait Store: Sync {
    /// Moves the staged folder `fdir`'s cur/ and new/ (folder `folder` of the backup), whose
    /// messages `records` are, into a new store entry, leaving links to it; returns its id.
    fn store_folder(&self, folder: &str, fdir: &Dir, records: crate::manifest::part::Records) -> Result<String, BackupError>;
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    pub copied: u64,
    pub linked: u64,
    pub bytes: u64,
    pub renamed: u64,
    pub moved: u64,
    pub removed: u64,
    pub vanished: u64,
}

impl PassStats {
    pub fn changes(&self) -> u64 {
        self.copied + self.linked + self.renamed + self.moved + self.removed + self.vanished
    }
    pub fn add(&mut self, o: &PassStats) {
        self.copied += o.copied;
        self.linked += o.linked;
        self.bytes += o.bytes;
        self.renamed += o.renamed;
        self.moved += o.moved;
        self.removed += o.removed;
        self.vanished += o.vanished;
    }
}

/// What a pass's listings say against the staged copy.
#[derive(Default)]
struct Diff {
    /// Messages that left a folder, by key: a candidate source for a move into another. One
    /// unique name can leave several folders in one pass (Dovecot's COPY/MOVE hard-link under
    /// the same name), so every one is kept: each staged copy must be reused or removed.
    departed: HashMap<String, Vec<(PathBuf, Entry)>>,
    /// New in each folder: (key, where it is), by folder (a path per folder, not per message:
    /// in a first pass every message is new).
    added: Vec<(PathBuf, Vec<CopyJob>)>,
    gone_folders: Vec<PathBuf>,
}

/// A message to copy (or link) into a folder's staged copy.
struct CopyJob {
    /// Its key if that is not its name's unique part (see `Entries`).
    own_key: Option<Box<str>>,
    listed: Listed,
}

impl CopyJob {
    fn key(&self) -> &str {
        match &self.own_key {
            Some(k) => k,
            None => unique_part(&self.listed.name),
        }
    }

    /// The entry it made, its name moved out of the job.
    fn take_entry(&mut self, m: Staged) -> (Option<String>, Entry) {
        let name = std::mem::take(&mut self.listed.name).into_boxed_str();
        (self.own_key.take().map(String::from), Entry { sub: self.listed.sub, name, size: m.size, blake3: m.blake3 })
    }
}

/// What a pass's jobs made, by folder, until it goes into the tree (the jobs' directories are
/// being read meanwhile).
struct Made {
    entries: Vec<Entries>,
    deferred: Vec<Deferred>,
    warnings: Vec<String>,
}

impl Made {
    fn for_jobs(jobs: &[(PathBuf, Vec<CopyJob>)]) -> Made {
        let entries = jobs.iter().map(|(_, js)| {
            let mut e = Entries::default();
            e.reserve(js.len());
            e
        });
        Made { entries: entries.collect(), deferred: Vec::new(), warnings: Vec::new() }
    }

    /// Records the `results` of the jobs of `run`, moving each name from its job.
    fn record(&mut self, jobs: &mut [(PathBuf, Vec<CopyJob>)], run: &[(usize, Range<usize>)], results: Vec<Result<JobResult, BackupError>>, stats: &mut PassStats) -> Result<(), BackupError> {
        let mut results = results.into_iter();
        for (f, range) in run {
            for (job, result) in jobs[*f].1[range.clone()].iter_mut().zip(results.by_ref()) {
                let staged = match result? {
                    JobResult::Copied(s) => {
                        stats.copied += 1;
                        stats.bytes += s.size;
                        s
                    }
                    JobResult::Deferred(s, d) => {
                        stats.copied += 1;
                        self.deferred.push(*d);
                        s
                    }
                    JobResult::Linked(s) => {
                        stats.linked += 1;
                        s
                    }
                    JobResult::Vanished => {
                        stats.vanished += 1;
                        continue;
                    }
                    JobResult::Skipped(w) => {
                        self.warnings.push(w);
                        continue;
                    }
                };
                let (key, entry) = job.take_entry(staged);
                self.entries[*f].insert_keyed(key, entry);
            }
        }
        Ok(())
    }
}

/// Jobs run at once, at most: only their results are held (and, while the locks are held, no
/// more are waited for).
const RUN_JOBS: usize = 20_000;

/// What a job staged: the entry's size and checksum (its place and name are the job's, moved
/// into the entry, not copied: one string per message fewer at the peak of a first copy).
struct Staged {
    size: u64,
    blake3: Option<blake3::Hash>,
}

enum JobResult {
    Copied(Staged),
    /// Staged empty, to be filled once the locks are let go (size known, checksum not yet).
    Deferred(Staged, Box<Deferred>),
    Linked(Staged),
    Vanished,
    /// Not a message we may read (planted): the warning to give.
    Skipped(String),
}

fn staged_path(rel: &Path, sub: Subdir, name: &str) -> PathBuf {
    rel.join(sub.as_str()).join(name)
}

/// A name seen twice in one listing (a readdir racing Dovecot's rename of a message reports
/// the old and the new name, the second under a `\0dup:` key) leaves two keys behind; once one
/// file is left, both may point at it. The keys that can share the file named `name`.
fn keys_for_name(name: &str) -> [String; 2] {
    let unique = unique_part(name);
    [unique.to_string(), format!("\0dup:{name}")]
}

/// Each file is one entry: a staged entry at a place the listing gives another key is
/// forgotten (not removed: the file is the listed key's now).
fn forget_other_keys_at(entries: &mut Entries, listed: &Keyed<Listed>) {
    for (key, l) in listed.iter() {
        for other in keys_for_name(&l.name) {
            if other != key && entries.get(&other).is_some_and(|e| e.sub == l.sub && *e.name == l.name) {
                entries.remove(&other);
            }
        }
    }
}

/// Whether an entry of `state` other than a departed one is at `e`'s place (then the file is
/// not `e`'s to remove).
fn place_taken(state: Option<&FolderState>, e: &Entry) -> bool {
    let Some(state) = state else { return false };
    keys_for_name(&e.name).iter().any(|k| state.entries.get(k).is_some_and(|o| o.sub == e.sub && o.name == e.name))
}

impl Tree {
    pub fn new(staging: Dir, keep_owner: bool) -> Tree {
        Tree {
            staging,
            folders: BTreeMap::new(),
            keep_owner,
            warnings: Vec::new(),
            warned: HashSet::new(),
            unshown: 0,
            shared: HashMap::new(),
            deferring: false,
            deferred: Vec::new(),
            messages: MessageFiles::Copy,
            linked_control: Mutex::new(HashSet::new()),
            spill: None,
            spill_tried: false,
        }
    }

    /// Writes the entries of the folders at `rels` to the scratch file and lets go of them
    /// (never while copies are deferred: those fill entries in). They come back when a pass
    /// changes the folder (`load`), or are read for its records (`sorted_entries`).
    pub fn spill_folders(&mut self, rels: &[PathBuf]) -> Result<(), BackupError> {
        if self.deferring || !self.deferred.is_empty() {
            return Ok(());
        }
        if !self.spill_tried {
            self.spill_tried = true;
            self.spill = Spill::new(&self.staging)?;
        }
        let Some(spill) = self.spill.as_mut() else { return Ok(()) };
        let folders = &mut self.folders;
        let spilling: HashSet<&PathBuf> = rels.iter().filter(|r| folders.get(*r).is_some_and(|s| s.spilled.is_none() && !s.entries.is_empty())).collect();
        for shared in self.shared.values_mut().filter(|s| spilling.contains(&s.at.0)) {
            shared.spilled = folders.get(&shared.at.0).and_then(|s| s.entries.get(&shared.at.1)).cloned();
        }
        for rel in spilling {
            let Some(state) = folders.get_mut(rel) else { continue };
            state.spilled = Some(spill.write(&state.entries)?);
            state.entries = Entries::default();
        }
        Ok(())
    }

    /// Brings the entries of the folder at `rel` back from the scratch file, for a pass to
    /// change them.
    pub fn load(&mut self, rel: &Path) -> Result<(), BackupError> {
        let Some(state) = self.folders.get_mut(rel) else { return Ok(()) };
        let (Some(at), Some(spill)) = (state.spilled, self.spill.as_ref()) else { return Ok(()) };
        state.entries = spill.read(&at)?;
        state.spilled = None;
        Ok(())
    }

    /// The entries of folder `state`, one at a time, sorted by place and name: read from the
    /// scratch file if they are there, never all of them held at once.
    pub fn sorted_entries<'s>(&'s self, state: &'s FolderState) -> Box<dyn Iterator<Item = Result<Cow<'s, Entry>, BackupError>> + 's> {
        match (state.spilled, self.spill.as_ref()) {
            (Some(at), Some(spill)) => Box::new(spill.entries(&at).map(|e| e.map(Cow::Owned))),
            _ => {
                let mut sorted: Vec<&Entry> = state.entries.values().collect();
                sorted.sort_by(|a, b| a.place().cmp(&b.place()));
                Box::new(sorted.into_iter().map(|e| Ok(Cow::Borrowed(e))))
            }
        }
    }

    /// Message files linked instead of copied (see [`MessageFiles`]).
    pub fn with_messages(mut self, messages: MessageFiles) -> Tree {
        self.messages = messages;
        self
    }

    /// From now on (while the locks are held), new messages are only opened and staged empty;
    /// `copy_deferred` fills them.
    pub fn defer_copies(&mut self, on: bool) {
        self.deferring = on;
    }

    /// Fills the staged files of the deferred copies (in parallel) and records their checksums.
    pub fn copy_deferred(&mut self, pool: &rayon::ThreadPool, progress: &dyn Progress) -> Result<PassStats, BackupError> {
        let mut deferred = std::mem::take(&mut self.deferred);
        let copied: Vec<Result<fsx::Copied, BackupError>> = pool.install(|| {
            deferred
                .par_iter_mut()
                .map(|d| {
                    let c = fsx::copy_file(&mut d.input, &d.out, d.owner).map_err(|fail| copy_fail(&d.input.path, &d.shown, fail))?;
                    progress.advance(0, c.size);
                    Ok(c)
                })
                .collect()
        });
        let mut stats = PassStats::default();
        for (d, c) in deferred.iter().zip(copied) {
            let c = c?;
            stats.bytes += c.size;
            // Wherever a later pass left it (its folder, or another it moved to under the same
            // key; nowhere if removed). Only deferred entries lack a checksum.
            for state in self.folders.values_mut() {
                state.entries.fill_deferred(&d.key, c.size, digest(&c.blake3));
            }
        }
        Ok(stats)
    }

    /// Records a warning once, however many passes meet the same thing.
    pub fn warn(&mut self, w: &str) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        w.hash(&mut h);
        if !self.warned.insert(h.finish()) {
            return;
        }
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w.to_string());
        } else {
            self.unshown += 1;
        }
    }

    /// The warnings given, and how many more there were.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.warnings.clone();
        if self.unshown > 0 {
            w.push(format!("{} more warnings not shown", self.unshown));
        }
        w
    }

    pub fn warn_all(&mut self, warnings: Vec<String>) {
        for w in warnings {
            self.warn(&w);
        }
    }

    fn ensure_folder(&mut self, folder: &Folder) -> Result<(), BackupError> {
        if self.folders.contains_key(&folder.rel) {
            return Ok(());
        }
        let dir = self.staging.ensure_dirs(&folder.rel, 0o700, None)?;
        for sub in MESSAGE_DIRS {
            dir.mkdir(sub, 0o700)?;
        }
        self.folders.insert(
            folder.rel.clone(),
            FolderState { folder: folder.clone(), entries: Entries::default(), spilled: None, stamps: [None, None], listed_at: None, taken_over: None },
        );
        Ok(())
    }

    /// Takes `folder` over from the previous snapshot if its directories (with stamps `now`)
    /// are as that snapshot listed them; true if it did. Then it is not listed unless it
    /// changes during the backup.
    pub fn take_over(&mut self, folder: &Folder, now: [Option<DirStamp>; 2], reuse: &dyn Reuse) -> Result<bool, BackupError> {
        if self.folders.contains_key(&folder.rel) {
            return Ok(false);
        }
        let Some(record) = reuse.take_over(&folder.rel, now) else { return Ok(false) };
        let Some(id) = record.store.as_deref() else { return Ok(false) };
        let dir = self.staging.ensure_dirs(&folder.rel, 0o700, None)?;
        store::link_folder(&dir, &folder.rel.to_string_lossy(), id)?;
        dir.mkdir("tmp", 0o700)?;
        let listed_at = record.source_dirs.map(|d| SystemTime::UNIX_EPOCH + Duration::from_nanos(d.listed_at_ns.max(0) as u64));
        let state = FolderState { folder: folder.clone(), entries: Entries::default(), spilled: None, stamps: now, listed_at, taken_over: Some(record) };
        self.folders.insert(folder.rel.clone(), state);
        Ok(true)
    }

    /// A taken-over folder that changed after all: its own cur/ and new/ again, empty, for a
    /// full listing to fill.
    fn give_back(&mut self, rel: &Path) -> Result<(), BackupError> {
        let Some(state) = self.folders.get_mut(rel) else { return Ok(()) };
        if state.taken_over.take().is_none() {
            return Ok(());
        }
        let dir = self.staging.sub(rel)?;
        for sub in Subdir::ALL {
            dir.unlink(sub.as_str())?;
            dir.mkdir(sub.as_str(), 0o700)?;
        }
        Ok(())
    }

    /// Removes a folder that no longer exists in the source (its messages may already have
    /// been moved elsewhere by `apply`).
    fn drop_folder(&mut self, rel: &Path) -> Result<(), FsError> {
        let Some(state) = self.folders.remove(rel) else { return Ok(()) };
        let Some(dir) = self.staging.sub_opt(rel)? else { return Ok(()) };
        for sub in MESSAGE_DIRS {
            dir.remove_tree(sub)?;
        }
        // A LAYOUT=fs parent may still hold child folders: only remove it if empty.
        if !state.folder.is_inbox() {
            self.staging.rmdir(rel)?;
        }
        Ok(())
    }

    /// Applies fresh listings (None = the folder is gone) to the staged copy: renames what was
    /// renamed, moves what moved between folders, copies what is new, removes what is gone.
    pub fn apply(
        &mut self,
        md: &Maildir,
        listings: Vec<(Folder, Option<Listing>)>,
        pool: &rayon::ThreadPool,
        reuse: Option<&dyn Reuse>,
        progress: &dyn Progress,
    ) -> Result<PassStats, BackupError> {
        let mut stats = PassStats::default();
        let mut diff = Diff::default();
        for (folder, listing) in listings {
            self.take_listing(&folder, listing, &mut diff, &mut stats)?;
        }
        let jobs = self.move_or_queue(diff.added, &mut diff.departed, &mut stats)?;
        self.copy(md, jobs, pool, reuse, progress, &mut stats)?;
        self.remove_departed(diff.departed, &mut stats)?;
        for rel in diff.gone_folders {
            self.drop_folder(&rel)?;
        }
        Ok(stats)
    }

    /// Compares one folder's listing with its staged copy: renames in the copy what was renamed
    /// in the folder; notes what is new and what left (in `diff`).
    fn take_listing(&mut self, folder: &Folder, listing: Option<Listing>, diff: &mut Diff, stats: &mut PassStats) -> Result<(), BackupError> {
        self.load(&folder.rel)?;
        let Some(listing) = listing else {
            if let Some(state) = self.folders.get_mut(&folder.rel) {
                for (k, e) in std::mem::take(&mut state.entries) {
                    diff.departed.entry(k).or_default().push((folder.rel.clone(), e));
                }
            }
            diff.gone_folders.push(folder.rel.clone());
            return Ok(());
        };
        self.ensure_folder(folder)?;
        self.give_back(&folder.rel)?;
        self.warn_all(listing.warnings);
        let state = self.folders.get_mut(&folder.rel).expect("ensured above");
        state.stamps = listing.stamps;
        state.listed_at = listing.listed_at;
        // What left: of a partial listing's keys only (under the locks, a pass must not cost
        // as much as the folder is big), of every key after a full one.
        let gone: Vec<String> = match &listing.touched {
            Some(touched) => touched.iter().filter(|k| state.entries.contains_key(k) && !listing.entries.contains_key(k)).cloned().collect(),
            None => state.entries.keys().filter(|k| !listing.entries.contains_key(k)).map(str::to_string).collect(),
        };
        for k in gone {
            if let Some(e) = state.entries.remove(&k) {
                diff.departed.entry(k).or_default().push((folder.rel.clone(), e));
            }
        }
        forget_other_keys_at(&mut state.entries, &listing.entries);
        let mut added = Vec::new();
        for (own_key, listed) in listing.entries.into_keyed() {
            let job = CopyJob { own_key: own_key.map(String::into_boxed_str), listed };
            let (key, listed) = (job.key(), &job.listed);
            match state.entries.get(key) {
                Some(e) if e.sub == listed.sub && *e.name == listed.name => {}
                Some(e) => {
                    // Flags changed or new/ -> cur/: the same message under a new name.
                    let from = staged_path(&folder.rel, e.sub, &e.name);
                    let to = staged_path(&folder.rel, listed.sub, &listed.name);
                    self.staging.rename(&from, &self.staging, &to, Replace::Allowed)?;
                    let key = key.to_string();
                    state.entries.set_place(&key, job.listed.sub, job.listed.name.into_boxed_str());
                    stats.renamed += 1;
                }
                None => added.push(job),
            }
        }
        if !added.is_empty() {
            diff.added.push((folder.rel.clone(), added));
        }
        Ok(())
    }

    /// Removes the staged copies of the messages that left and went nowhere in this pass; but
    /// not a file a staged entry still has (see `keys_for_name`).
    fn remove_departed(&mut self, departed: HashMap<String, Vec<(PathBuf, Entry)>>, stats: &mut PassStats) -> Result<(), BackupError> {
        for (rel, e) in departed.into_values().flatten() {
            if !place_taken(self.folders.get(&rel), &e) {
                self.staging.unlink(staged_path(&rel, e.sub, &e.name))?;
            }
            stats.removed += 1;
        }
        Ok(())
    }

    /// A new message that left another folder in this pass was moved (Dovecot keeps the unique
    /// name): moves our copy too. The others are to be copied: returned by folder.
    fn move_or_queue(
        &mut self,
        added: Vec<(PathBuf, Vec<CopyJob>)>,
        departed: &mut HashMap<String, Vec<(PathBuf, Entry)>>,
        stats: &mut PassStats,
    ) -> Result<Vec<(PathBuf, Vec<CopyJob>)>, BackupError> {
        let mut jobs: BTreeMap<PathBuf, Vec<CopyJob>> = BTreeMap::new();
        for (rel, new) in added {
            let mut queued = Vec::new();
            for job in new {
                let Some((from_rel, e)) = departed.get_mut(job.key()).and_then(Vec::pop) else {
                    queued.push(job);
                    continue;
                };
                let CopyJob { own_key, listed } = job;
                let from = staged_path(&from_rel, e.sub, &e.name);
                let to = staged_path(&rel, listed.sub, &listed.name);
                self.staging.rename(&from, &self.staging, &to, Replace::Allowed)?;
                let entry = Entry { sub: listed.sub, name: listed.name.into_boxed_str(), ..e };
                self.folders.get_mut(&rel).expect("listed folder is staged").entries.insert_keyed(own_key.map(String::from), entry);
                stats.moved += 1;
            }
            if !queued.is_empty() {
                jobs.entry(rel).or_default().extend(queued);
            }
        }
        Ok(jobs.into_iter().collect())
    }

    /// Copies (or links) the new messages and records them.
    fn copy(
        &mut self,
        md: &Maildir,
        jobs: Vec<(PathBuf, Vec<CopyJob>)>,
        pool: &rayon::ThreadPool,
        reuse: Option<&dyn Reuse>,
        progress: &dyn Progress,
        stats: &mut PassStats,
    ) -> Result<(), BackupError> {
        // Not under the locks: reading a big previous snapshot's records takes seconds.
        if let (Some(reuse), false, false) = (reuse, jobs.is_empty(), self.deferring) {
            reuse.read_ahead();
        }
        let shared = SharedInodes::new(self);
        let mut jobs = jobs;
        let mut made = Made::for_jobs(&jobs);
        // In runs of a few folders' jobs (one directory's lock is not a bottleneck, and only a
        // run's directories are open at once), each run's results recorded before the next.
        for run in runs(&jobs) {
            let results = self.run_jobs(md, &jobs, &run, pool, reuse, &shared, progress)?;
            made.record(&mut jobs, &run, results, stats)?;
        }
        let newly_shared: Vec<_> = shared.into_new().collect();
        self.shared.extend(newly_shared.into_iter().map(|(id, c)| (id, SharedAt { at: c.at, stamp: c.stamp, spilled: None })));
        for ((rel, _), entries) in jobs.into_iter().zip(made.entries) {
            self.folders.get_mut(&rel).expect("job folder is staged").entries.extend(entries);
        }
        self.deferred.extend(made.deferred);
        self.warn_all(made.warnings);
        Ok(())
    }

    /// Copies the jobs of `run` (folder and range of its jobs) in parallel; their results in
    /// job order.
    #[allow(clippy::too_many_arguments)]
    fn run_jobs(
        &self,
        md: &Maildir,
        jobs: &[(PathBuf, Vec<CopyJob>)],
        run: &[(usize, Range<usize>)],
        pool: &rayon::ThreadPool,
        reuse: Option<&dyn Reuse>,
        shared: &SharedInodes,
        progress: &dyn Progress,
    ) -> Result<Vec<Result<JobResult, BackupError>>, BackupError> {
        let mut dirs = Vec::with_capacity(run.len());
        for (f, _) in run {
            let rel = &jobs[*f].0;
            // The source's cur/ and new/ (None: gone or planted since the listing, which said so).
            let src: [Option<Dir>; 2] = match md.root.sub_opt(rel) {
                Ok(Some(d)) => super::scan::open_subdirs(&d, &mut Vec::new())?,
                Ok(None) => [None, None],
                Err(e) if e.is_planted() => [None, None],
                Err(e) => return Err(e.into()),
            };
            dirs.push((src, [self.staging.sub(rel.join("cur"))?, self.staging.sub(rel.join("new"))?]));
        }
        let all: Vec<(usize, &CopyJob)> = run.iter().enumerate().flat_map(|(i, (f, range))| jobs[*f].1[range.clone()].iter().map(move |j| (i, j))).collect();
        let slots = std::sync::atomic::AtomicUsize::new(MAX_DEFERRED.saturating_sub(self.deferred.len()));
        let defer_slots = self.deferring.then_some(&slots);
        let one = |&(f, job): &(usize, &CopyJob)| {
            let (src, dst) = &dirs[f];
            let i = job.listed.sub.index();
            let r = match &src[i] {
                Some(s) => {
                    let ctx = JobContext { rel: &jobs[run[f].0].0, src: s, dst: &dst[i], staging: &self.staging, keep_owner: self.keep_owner, messages: self.messages, reuse, shared, defer_slots };
                    ctx.run(job)
                }
                None => Ok(JobResult::Vanished),
            };
            match &r {
                Ok(JobResult::Copied(m) | JobResult::Linked(m)) => progress.advance(1, m.size),
                Ok(JobResult::Deferred(..)) => progress.advance(1, 0),
                _ => {}
            }
            r
        };
        let mut results = Vec::with_capacity(all.len());
        pool.install(|| results.par_extend(all.par_iter().map(one)));
        Ok(results)
    }
}

/// The jobs cut into runs of at most `FOLDERS_PER_BATCH` folders and `RUN_JOBS` jobs: (folder,
/// range of its jobs) each.
fn runs(jobs: &[(PathBuf, Vec<CopyJob>)]) -> Vec<Vec<(usize, Range<usize>)>> {
    let (mut out, mut run, mut in_run) = (Vec::new(), Vec::new(), 0);
    for (f, (_, js)) in jobs.iter().enumerate() {
        let mut start = 0;
        while start < js.len() {
            let end = js.len().min(start + RUN_JOBS - in_run);
            run.push((f, start..end));
            (in_run, start) = (in_run + end - start, end);
            if in_run == RUN_JOBS || run.len() == FOLDERS_PER_BATCH {
                out.push(std::mem::take(&mut run));
                in_run = 0;
            }
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

/// Folders whose jobs run together (each holds four directories open meanwhile).
pub(crate) const FOLDERS_PER_BATCH: usize = 64;

/// How `--link` went for one message.
enum Linking {
    Linked,
    /// Unlinked from the source since it was opened.
    Gone,
    /// At its file system's limit of links: copied instead.
    TooManyLinks,
}

/// Where one folder's jobs read and write, and what they may link instead.
struct JobContext<'a> {
    rel: &'a Path,
    src: &'a Dir,
    dst: &'a Dir,
    staging: &'a Dir,
    keep_owner: bool,
    messages: MessageFiles,
    reuse: Option<&'a dyn Reuse>,
    shared: &'a SharedInodes<'a>,
    /// Copies that may still be deferred in this pass (None: none may).
    defer_slots: Option<&'a std::sync::atomic::AtomicUsize>,
}

impl JobContext<'_> {
    /// The new staged file `name`. One already there (left by a readdir that saw a message
    /// under two names) is a copy of the same message file: it is replaced (the staging
    /// directory is ours alone).
    fn create_staged(&self, name: &str) -> Result<std::fs::File, FsError> {
        match self.dst.create(name, 0o600) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                self.dst.unlink(name)?;
                self.dst.create(name, 0o600)
            }
            r => r,
        }
    }

    /// `--link`: the very source file we opened and checked, under `name` in the staged copy.
    fn link(&self, input: &fsx::ReadFile, name: &str) -> Result<Linking, BackupError> {
        let mut linked = self.dst.link_file(&input.file, name);
        if linked.as_ref().is_err_and(|e| e.errno() == Some(libc::EEXIST)) {
            // Left by a readdir that saw the message under two names (see `create_staged`).
            self.dst.unlink(name)?;
            linked = self.dst.link_file(&input.file, name);
        }
        match linked {
            Ok(()) => Ok(Linking::Linked),
            // Expunged since we opened it: a file with no name left cannot be given one.
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(Linking::Gone),
            Err(e) if e.errno() == Some(libc::EMLINK) => Ok(Linking::TooManyLinks),
            // A mount inside the Maildir: the check before the backup saw only its top.
            Err(e) if e.errno() == Some(libc::EXDEV) => Err(BackupError::LinkAcrossMounts { dest: self.dst.show(name), source_dir: input.path.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Size and BLAKE3 of a linked message, read to the size it had when opened.
    fn hash(&self, input: &mut fsx::ReadFile) -> Result<(u64, String), BackupError> {
        fsx::hash_file(input).map_err(|e| BackupError::Fs(FsError::Io { op: "read message", path: input.path.clone(), source: e }))
    }

    /// Takes a deferral slot, if copies are being deferred and one is left.
    fn may_defer(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.defer_slots.is_some_and(|s| s.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok())
    }

    fn run(&self, job: &CopyJob) -> Result<JobResult, BackupError> {
        let name = job.listed.name.as_str();
        let made = |size, blake3: String| Staged { size, blake3: digest(&blake3) };
        // A message first seen under the locks is not looked up in records not read yet (every
        // session of the user would wait for that read): it is copied once they are let go.
        if let Some(reuse) = self.reuse.filter(|r| self.defer_slots.is_none() || r.ready()) {
            // Same unique name = same message (Maildir files never change); the sizes must
            // agree too, or it is copied afresh. Dovecot's names carry the size (`S=`), which
            // is part of the unique name: only a name without it costs a stat.
            let parsed = MessageName::parse(name);
            let size = match parsed.and_then(|m| m.size()) {
                Some(size) => size,
                None => match self.src.lstat(name)? {
                    Some(md) if md.is_file() => md.size(),
                    _ => return Ok(JobResult::Vanished),
                },
            };
            let unique = parsed.map_or(job.key(), |m| m.unique());
            if let Some(blake3) = reuse.link_into(unique, size, self.dst, name) {
                return Ok(JobResult::Linked(made(size, blake3)));
            }
        }
        let mut input = match self.src.open_read(name) {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(JobResult::Vanished),
            Err(e) if e.is_planted() => return Ok(JobResult::Skipped(format!("skipped {e}"))),
            Err(e) => return Err(e.into()),
        };
        if let MessageFiles::Link { checksums } = self.messages {
            match self.link(&input, name)? {
                Linking::Linked => {
                    let (size, blake3) = if checksums { self.hash(&mut input)? } else { (input.meta.size(), String::new()) };
                    return Ok(JobResult::Linked(made(size, blake3)));
                }
                Linking::Gone => return Ok(JobResult::Vanished),
                Linking::TooManyLinks => {}
            }
        }
        // A file with other names: copied once, by the first job to meet it; linked after.
        let stamp = stamp_of(&input.meta);
        let mut claim = None;
        if input.meta.nlink() > 1 {
            match self.shared.find_or_claim((input.meta.dev(), input.meta.ino()), stamp) {
                Ok(copy) => {
                    if self.staging.link(&copy.path, self.dst, name).is_ok() {
                        return Ok(JobResult::Linked(made(copy.size, copy.blake3)));
                    }
                }
                Err(c) => claim = c,
            }
        }
        let out = self.create_staged(name)?;
        let owner = self.keep_owner.then(|| input.meta.owner());
        if claim.is_none() && self.may_defer() {
            let size = input.meta.size();
            let d = Deferred { key: job.key().to_string(), shown: self.dst.show(name), input, out, owner };
            return Ok(JobResult::Deferred(made(size, String::new()), Box::new(d)));
        }
        let c = fsx::copy_file(&mut input, &out, owner).map_err(|fail| {
            let _ = self.dst.unlink(name);
            copy_fail(&input.path, &self.dst.show(name), fail)
        })?;
        if let Some(claim) = claim {
            let at = (self.rel.to_path_buf(), job.key().to_string());
            claim.settle(SharedCopy { path: staged_path(self.rel, job.listed.sub, name), stamp, size: c.size, blake3: c.blake3.clone(), at });
        }
        Ok(JobResult::Copied(made(c.size, c.blake3)))
    }
}

fn copy_fail(from: &Path, to: &Path, fail: fsx::CopyFail) -> BackupError {
    BackupError::Fs(match fail {
        fsx::CopyFail::Source(e) => FsError::Io { op: "read message", path: from.to_path_buf(), source: e },
        fsx::CopyFail::Dest(e) => FsError::Io { op: "write backup copy", path: to.to_path_buf(), source: e },
    })
}

#[cfg(test)]
mod tests;
