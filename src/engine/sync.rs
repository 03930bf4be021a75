//! One synchronisation pass: bring the staged copy of every listed folder in line with a
//! fresh listing of the source. Renames (flag changes, new/ -> cur/) become renames in the
//! copy, messages moved between folders are moved in the copy, only new messages are read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;

use super::scan::{DirStamp, Listed, Listing};
use super::{BackupError, Progress};
use crate::fsx::{self, Dir, FsError, Replace};
use crate::maildir::{Folder, Maildir, MessageName, Subdir, FOLDER_CONTROL_FILES, MAILDIRFOLDER, MESSAGE_DIRS};

/// A message as it is in the staged copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sub: Subdir,
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// The staged copy of one folder.
#[derive(Debug)]
pub struct FolderState {
    pub folder: Folder,
    pub entries: HashMap<String, Entry>,
    pub stamps: [Option<DirStamp>; 2],
    pub listed_at: Option<SystemTime>,
}

/// Everything staged so far, by folder path.
pub struct Tree {
    /// The staging directory: ours alone (0700), so nothing in it was planted.
    pub staging: Dir,
    pub folders: BTreeMap<PathBuf, FolderState>,
    pub keep_owner: bool,
    pub warnings: Vec<String>,
}

/// Finds an existing copy of a message to hard-link instead of reading the source
/// (the previous snapshot of a repository).
pub trait Reuse: Sync {
    /// Hard-links an earlier copy of message `unique`, `size` bytes in the source, into `dst`
    /// as `name`; its BLAKE3 if it did.
    fn link_into(&self, unique: &str, size: u64, dst: &Dir, name: &str) -> Option<String>;
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

/// A message to copy (or link) into a folder's staged copy.
struct CopyJob {
    key: String,
    listed: Listed,
}

enum JobResult {
    /// Copied; with a warning if the file was odd (sparse).
    Copied(Entry, Option<String>),
    Linked(Entry),
    Vanished,
    /// Not a message we may read (planted): the warning to give.
    Skipped(String),
}

fn staged_path(rel: &Path, sub: Subdir, name: &str) -> PathBuf {
    rel.join(sub.as_str()).join(name)
}

impl Tree {
    pub fn new(staging: Dir, keep_owner: bool) -> Tree {
        Tree { staging, folders: BTreeMap::new(), keep_owner, warnings: Vec::new() }
    }

    /// Records a warning once, however many passes meet the same thing.
    pub fn warn(&mut self, w: &str) {
        if !self.warnings.iter().any(|x| x == w) {
            self.warnings.push(w.to_string());
        }
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
            FolderState { folder: folder.clone(), entries: HashMap::new(), stamps: [None, None], listed_at: None },
        );
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
        for f in FOLDER_CONTROL_FILES.iter().chain([MAILDIRFOLDER].iter()) {
            dir.unlink(f)?;
        }
        // A LAYOUT=fs parent may still hold child folders: only remove it if empty.
        if !state.folder.is_inbox() {
            self.staging.rmdir(rel)?;
        }
        Ok(())
    }

    /// Applies fresh listings (None = the folder is gone) to the staged copy.
    pub fn apply(
        &mut self,
        md: &Maildir,
        listings: Vec<(Folder, Option<Listing>)>,
        pool: &rayon::ThreadPool,
        reuse: Option<&dyn Reuse>,
        progress: &dyn Progress,
    ) -> Result<PassStats, BackupError> {
        let mut stats = PassStats::default();
        // Messages that left a folder, by key: a candidate source for a move into another. One
        // unique name can leave several folders in one pass (Dovecot's COPY/MOVE hard-link under
        // the same name), so keep every one: each staged copy must be reused or removed.
        let mut departed: HashMap<String, Vec<(PathBuf, Entry)>> = HashMap::new();
        let mut added: Vec<(PathBuf, String, Listed)> = Vec::new();
        let mut gone_folders = Vec::new();

        for (folder, listing) in listings {
            let Some(listing) = listing else {
                if let Some(state) = self.folders.get_mut(&folder.rel) {
                    for (k, e) in state.entries.drain() {
                        departed.entry(k).or_default().push((folder.rel.clone(), e));
                    }
                }
                gone_folders.push(folder.rel.clone());
                continue;
            };
            self.ensure_folder(&folder)?;
            for w in &listing.warnings {
                self.warn(w);
            }
            let state = self.folders.get_mut(&folder.rel).expect("ensured above");
            state.stamps = listing.stamps;
            state.listed_at = listing.listed_at;
            let in_scope = |k: &String| listing.touched.as_ref().is_none_or(|t| t.contains(k));
            let gone: Vec<String> =
                state.entries.keys().filter(|k| !listing.entries.contains_key(*k) && in_scope(k)).cloned().collect();
            for k in gone {
                if let Some(e) = state.entries.remove(&k) {
                    departed.entry(k).or_default().push((folder.rel.clone(), e));
                }
            }
            for (key, listed) in listing.entries {
                match state.entries.get_mut(&key) {
                    Some(e) if e.sub == listed.sub && e.name == listed.name => {}
                    Some(e) => {
                        // Flags changed or new/ -> cur/: the same message under a new name.
                        let from = staged_path(&folder.rel, e.sub, &e.name);
                        let to = staged_path(&folder.rel, listed.sub, &listed.name);
                        self.staging.rename(&from, &self.staging, &to, Replace::Allowed)?;
                        e.sub = listed.sub;
                        e.name = listed.name;
                        stats.renamed += 1;
                    }
                    None => added.push((folder.rel.clone(), key, listed)),
                }
            }
        }

        let mut jobs: BTreeMap<PathBuf, Vec<CopyJob>> = BTreeMap::new();
        for (rel, key, listed) in added {
            if let Some((from_rel, e)) = departed.get_mut(&key).and_then(Vec::pop) {
                // Moved between folders (Dovecot keeps the unique name): move our copy too.
                let from = staged_path(&from_rel, e.sub, &e.name);
                let to = staged_path(&rel, listed.sub, &listed.name);
                self.staging.rename(&from, &self.staging, &to, Replace::Allowed)?;
                let entry = Entry { sub: listed.sub, name: listed.name, ..e };
                self.folders.get_mut(&rel).expect("listed folder is staged").entries.insert(key, entry);
                stats.moved += 1;
                continue;
            }
            jobs.entry(rel).or_default().push(CopyJob { key, listed });
        }

        // Folder by folder, so only one folder's directories are open at a time.
        for (rel, jobs) in jobs {
            let results = self.run_jobs(md, &rel, &jobs, pool, reuse, progress)?;
            let state = self.folders.get_mut(&rel).expect("job folder is staged");
            let mut warnings = Vec::new();
            for (job, result) in jobs.into_iter().zip(results) {
                match result? {
                    JobResult::Copied(e, warning) => {
                        stats.copied += 1;
                        stats.bytes += e.size;
                        state.entries.insert(job.key, e);
                        warnings.extend(warning);
                    }
                    JobResult::Linked(e) => {
                        stats.linked += 1;
                        state.entries.insert(job.key, e);
                    }
                    JobResult::Vanished => stats.vanished += 1,
                    JobResult::Skipped(w) => warnings.push(w),
                }
            }
            for w in warnings {
                self.warn(&w);
            }
        }

        for (rel, e) in departed.into_values().flatten() {
            self.staging.unlink(staged_path(&rel, e.sub, &e.name))?;
            stats.removed += 1;
        }
        for rel in gone_folders {
            self.drop_folder(&rel)?;
        }
        Ok(stats)
    }

    /// Copies one folder's new messages in parallel.
    fn run_jobs(
        &self,
        md: &Maildir,
        rel: &Path,
        jobs: &[CopyJob],
        pool: &rayon::ThreadPool,
        reuse: Option<&dyn Reuse>,
        progress: &dyn Progress,
    ) -> Result<Vec<Result<JobResult, BackupError>>, BackupError> {
        // The source's cur/ and new/ (None: gone or planted since the listing, which reported it).
        let src: [Option<Dir>; 2] = match md.root.sub_opt(rel) {
            Ok(Some(d)) => super::scan::open_subdirs(&d, &mut Vec::new())?,
            Ok(None) | Err(FsError::Symlink { .. }) => [None, None],
            Err(e) => return Err(e.into()),
        };
        let dst = [self.staging.sub(rel.join("cur"))?, self.staging.sub(rel.join("new"))?];
        let keep_owner = self.keep_owner;
        Ok(pool.install(|| {
            jobs.par_iter()
                .map(|job| {
                    let i = job.listed.sub.index();
                    let r = match &src[i] {
                        Some(s) => run_job(job, s, &dst[i], keep_owner, reuse),
                        None => Ok(JobResult::Vanished),
                    };
                    if let Ok(JobResult::Copied(e, _) | JobResult::Linked(e)) = &r {
                        progress.advance(1, e.size);
                    }
                    r
                })
                .collect()
        }))
    }
}

fn run_job(job: &CopyJob, src: &Dir, dst: &Dir, keep_owner: bool, reuse: Option<&dyn Reuse>) -> Result<JobResult, BackupError> {
    let name = job.listed.name.as_str();
    let entry = |size, blake3| Entry { sub: job.listed.sub, name: name.to_string(), size, blake3 };
    if let Some(reuse) = reuse {
        // Same unique name = same message (Maildir files never change); the sizes must
        // agree too, or it is copied afresh.
        let size = match src.lstat(name)? {
            Some(md) if md.is_file() => md.size(),
            _ => return Ok(JobResult::Vanished),
        };
        let unique = MessageName::parse(name).map(|m| m.unique()).unwrap_or(&job.key);
        if let Some(blake3) = reuse.link_into(unique, size, dst, name) {
            return Ok(JobResult::Linked(entry(size, blake3)));
        }
    }
    let mut input = match src.open_read(name) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(JobResult::Vanished),
        Err(e) if e.is_planted() => return Ok(JobResult::Skipped(format!("skipped {e}"))),
        Err(e) => return Err(e.into()),
    };
    let out = dst.create(name, 0o600)?;
    let owner = keep_owner.then(|| input.meta.owner());
    match fsx::copy_file(&mut input, &out, owner) {
        Ok(c) => {
            // Copied as it is, holes and all; but a message file is never sparse by itself.
            let warning = (c.holes > 0).then(|| {
                format!("{} is sparse ({} bytes, {} of them holes): copied with its holes", input.path.display(), c.size, c.holes)
            });
            Ok(JobResult::Copied(entry(c.size, c.blake3), warning))
        }
        Err(fail) => {
            let _ = dst.unlink(name);
            Err(match fail {
                fsx::CopyFail::Source(e) => BackupError::Fs(FsError::Io { op: "read message", path: input.path, source: e }),
                fsx::CopyFail::Dest(e) => BackupError::Fs(FsError::Io { op: "write backup copy", path: dst.show(name), source: e }),
            })
        }
    }
}
