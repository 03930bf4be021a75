//! Knowing what changed without reading whole directories: inotify watches on every
//! folder's cur/ and new/ from just before its first listing. At the reconcile only the
//! names that changed are looked at, so the time the locks are held depends on what changed
//! during the backup, not on how big the mailbox is. Where inotify cannot be trusted (NFS,
//! queue overflow, too many watches, a folder moved away) the folder is simply listed again.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::fsx::Dir;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::maildir::Subdir;

/// Names (in cur/ or new/) that were created, removed or renamed since last taken.
pub type Changes = HashSet<(Subdir, String)>;

#[derive(Default)]
struct FolderWatch {
    wds: Vec<WatchDescriptor>,
    /// Events were lost: the folder must be listed in full once more.
    needs_full: bool,
    changes: Changes,
}

pub struct Watcher {
    inotify: Inotify,
    folders: HashMap<PathBuf, FolderWatch>,
    by_wd: HashMap<WatchDescriptor, (PathBuf, Subdir)>,
}

const EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

impl Watcher {
    /// None where inotify is not available.
    pub fn new() -> Option<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        Some(Watcher { inotify, folders: HashMap::new(), by_wd: HashMap::new() })
    }

    /// Starts watching a folder's opened cur/ and new/; call it just *before* listing them in
    /// full, so no change between the listing and the watch can be missed. False if it cannot
    /// be watched (then the folder is listed in full every time).
    pub fn watch(&mut self, rel: &Path, subs: &[Option<Dir>; 2]) -> bool {
        // Always add the watches again: inotify gives back the existing descriptor for an
        // inode already watched, and a new one if `rel` now names other directories (a folder
        // renamed away moves cur/ and new/ without IN_MOVE_SELF, then is recreated or renamed
        // back). The full listing that follows covers whatever happened before.
        if let Some(old) = self.folders.remove(rel) {
            for wd in &old.wds {
                if self.by_wd.get(wd).is_some_and(|(r, _)| r == rel) {
                    self.by_wd.remove(wd);
                }
            }
        }
        let mut wds = Vec::with_capacity(2);
        for sub in Subdir::ALL {
            // Through /proc/self/fd: exactly the directory we opened (and will list), never
            // whatever a path names by now.
            let Some(dir) = &subs[sub.index()] else {
                self.forget_wds(&wds);
                return false;
            };
            match self.inotify.add_watch(&dir.proc_path(), EVENTS) {
                Ok(wd) => {
                    self.by_wd.insert(wd, (rel.to_path_buf(), sub));
                    wds.push(wd);
                }
                Err(_) => {
                    self.forget_wds(&wds);
                    self.folders.remove(rel);
                    return false;
                }
            }
        }
        self.folders.insert(rel.to_path_buf(), FolderWatch { wds, needs_full: false, changes: Changes::new() });
        true
    }

    fn forget_wds(&mut self, wds: &[WatchDescriptor]) {
        for wd in wds {
            let _ = self.inotify.rm_watch(*wd);
            self.by_wd.remove(wd);
        }
    }

    /// Reads every queued event into the per-folder change sets.
    pub fn drain(&mut self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(ev) if !ev.is_empty() => ev,
                Ok(_) | Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    self.all_need_full();
                    return;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.all_need_full();
                    continue;
                }
                let Some((rel, sub)) = self.by_wd.get(&ev.wd).cloned() else { continue };
                let lost = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED;
                if ev.mask.intersects(lost) {
                    // The directory went away or moved: stop trusting this folder's watch.
                    if let Some(w) = self.folders.remove(&rel) {
                        self.forget_wds(&w.wds);
                    }
                    continue;
                }
                if let (Some(w), Some(name)) = (self.folders.get_mut(&rel), ev.name.map(OsString::into_string)) {
                    match name {
                        Ok(name) => {
                            w.changes.insert((sub, name));
                        }
                        Err(_) => w.needs_full = true, // not UTF-8: let the full listing report it
                    }
                }
            }
        }
    }

    fn all_need_full(&mut self) {
        for w in self.folders.values_mut() {
            w.needs_full = true;
            w.changes.clear();
        }
    }

    /// What changed in a folder since the last call (after `drain`); None if the folder is
    /// not watched or lost events, and must be listed in full.
    pub fn take(&mut self, rel: &Path) -> Option<Changes> {
        let w = self.folders.get_mut(rel)?;
        if w.needs_full {
            return None;
        }
        Some(std::mem::take(&mut w.changes))
    }
}
