//! One synchronisation pass: bring the staged copy of every listed folder in line with a
//! fresh listing of the source. Renames (flag changes, new/ -> cur/) become renames in the
//! copy, messages moved between folders are moved in the copy, only new messages are read.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;

use super::copy::{copy_file, CopyError};
use super::scan::{DirStamp, Listed, Listing};
use super::{BackupError, Progress};
use crate::maildir::{Folder, Subdir};

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
    pub staging: PathBuf,
    pub folders: BTreeMap<PathBuf, FolderState>,
    pub keep_owner: bool,
    pub warnings: Vec<String>,
}

/// Finds an existing copy of a message to hard-link instead of reading the source
/// (the previous snapshot of a repository).
pub trait Reuse: Sync {
    /// An existing copy of message `unique` whose size is `size`: (path, size, blake3).
    fn find(&self, unique: &str, size: u64) -> Option<(PathBuf, u64, String)>;
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

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackupError + 'a {
    move |source| BackupError::Io { op, path: path.to_path_buf(), source }
}

struct CopyJob {
    rel: PathBuf,
    key: String,
    listed: Listed,
    src: PathBuf,
    dst: PathBuf,
}

enum JobResult {
    Copied(Entry),
    Linked(Entry),
    Vanished,
}

impl Tree {
    pub fn new(staging: PathBuf, keep_owner: bool) -> Tree {
        Tree { staging, folders: BTreeMap::new(), keep_owner, warnings: Vec::new() }
    }

    /// Records a warning once, however many passes meet the same thing.
    pub fn warn(&mut self, w: &str) {
        if !self.warnings.iter().any(|x| x == w) {
            self.warnings.push(w.to_string());
        }
    }

    pub fn staged_dir(&self, rel: &Path) -> PathBuf {
        self.staging.join(rel)
    }

    fn staged_file(&self, rel: &Path, sub: Subdir, name: &str) -> PathBuf {
        self.staging.join(rel).join(sub.as_str()).join(name)
    }

    fn ensure_folder(&mut self, folder: &Folder) -> Result<(), BackupError> {
        if self.folders.contains_key(&folder.rel) {
            return Ok(());
        }
        let dir = self.staged_dir(&folder.rel);
        for sub in ["cur", "new", "tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
        }
        self.folders.insert(
            folder.rel.clone(),
            FolderState { folder: folder.clone(), entries: HashMap::new(), stamps: [None, None], listed_at: None },
        );
        Ok(())
    }

    /// Removes a folder that no longer exists in the source (its messages may already have
    /// been moved elsewhere by `apply`).
    fn drop_folder(&mut self, rel: &Path) {
        if let Some(state) = self.folders.remove(rel) {
            let dir = self.staged_dir(rel);
            for sub in ["cur", "new", "tmp"] {
                let _ = fs::remove_dir_all(dir.join(sub));
            }
            for f in crate::maildir::FOLDER_CONTROL_FILES.iter().chain(["maildirfolder"].iter()) {
                let _ = fs::remove_file(dir.join(f));
            }
            // A LAYOUT=fs parent may still hold child folders: only remove it if empty.
            if !state.folder.is_inbox() {
                let _ = fs::remove_dir(&dir);
            }
        }
    }

    /// Applies fresh listings (None = the folder is gone) to the staged copy.
    pub fn apply(
        &mut self,
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
            let staging = self.staging.clone();
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
                        let from = staging.join(&folder.rel).join(e.sub.as_str()).join(&e.name);
                        let to = staging.join(&folder.rel).join(listed.sub.as_str()).join(&listed.name);
                        fs::rename(&from, &to).map_err(io_err("rename staged message", &from))?;
                        e.sub = listed.sub;
                        e.name = listed.name;
                        stats.renamed += 1;
                    }
                    None => added.push((folder.rel.clone(), key, listed)),
                }
            }
        }

        let mut jobs = Vec::new();
        for (rel, key, listed) in added {
            if let Some((from_rel, e)) = departed.get_mut(&key).and_then(Vec::pop) {
                // Moved between folders (Dovecot keeps the unique name): move our copy too.
                let from = self.staged_file(&from_rel, e.sub, &e.name);
                let to = self.staged_file(&rel, listed.sub, &listed.name);
                fs::rename(&from, &to).map_err(io_err("move staged message", &from))?;
                let entry = Entry { sub: listed.sub, name: listed.name, ..e };
                self.folders.get_mut(&rel).expect("listed folder is staged").entries.insert(key, entry);
                stats.moved += 1;
                continue;
            }
            let state = &self.folders[&rel];
            jobs.push(CopyJob {
                src: state.folder.mail_dir.join(listed.sub.as_str()).join(&listed.name),
                dst: self.staged_file(&rel, listed.sub, &listed.name),
                rel,
                key,
                listed,
            });
        }

        let keep_owner = self.keep_owner;
        let results: Vec<Result<JobResult, BackupError>> = pool.install(|| {
            jobs.par_iter()
                .map(|job| {
                    let r = run_job(job, keep_owner, reuse);
                    if let Ok(JobResult::Copied(e) | JobResult::Linked(e)) = &r {
                        progress.advance(1, e.size);
                    }
                    r
                })
                .collect()
        });
        for (job, result) in jobs.into_iter().zip(results) {
            let state = self.folders.get_mut(&job.rel).expect("job folder is staged");
            match result? {
                JobResult::Copied(e) => {
                    stats.copied += 1;
                    stats.bytes += e.size;
                    state.entries.insert(job.key, e);
                }
                JobResult::Linked(e) => {
                    stats.linked += 1;
                    state.entries.insert(job.key, e);
                }
                JobResult::Vanished => stats.vanished += 1,
            }
        }

        for (rel, e) in departed.into_values().flatten() {
            let path = self.staged_file(&rel, e.sub, &e.name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_err("remove staged message", &path)(err)),
            }
            stats.removed += 1;
        }
        for rel in gone_folders {
            self.drop_folder(&rel);
        }
        Ok(stats)
    }
}

fn run_job(job: &CopyJob, keep_owner: bool, reuse: Option<&dyn Reuse>) -> Result<JobResult, BackupError> {
    let unique = crate::maildir::MessageName::parse(&job.listed.name).map(|m| m.unique()).unwrap_or(&job.key);
    if let Some(reuse) = reuse {
        // Same unique name = same message (Maildir files never change); the sizes must
        // agree too, or it is copied afresh.
        let size = match fs::symlink_metadata(&job.src) {
            Ok(md) => md.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(JobResult::Vanished),
            Err(e) => return Err(BackupError::Io { op: "stat message", path: job.src.clone(), source: e }),
        };
        if let Some((old, size, blake3)) = reuse.find(unique, size) {
            if fs::hard_link(&old, &job.dst).is_ok() {
                return Ok(JobResult::Linked(Entry { sub: job.listed.sub, name: job.listed.name.clone(), size, blake3 }));
            }
        }
    }
    match copy_file(&job.src, &job.dst, keep_owner) {
        Ok(c) => Ok(JobResult::Copied(Entry { sub: job.listed.sub, name: job.listed.name.clone(), size: c.size, blake3: c.blake3 })),
        Err(CopyError::SourceVanished) => Ok(JobResult::Vanished),
        Err(CopyError::Source(e)) => Err(BackupError::Io { op: "read message", path: job.src.clone(), source: e }),
        Err(CopyError::Dest(e)) => {
            let _ = fs::remove_file(&job.dst);
            Err(BackupError::Io { op: "write backup copy", path: job.dst.clone(), source: e })
        }
    }
}
