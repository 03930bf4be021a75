//! Where the snapshots of a repository series keep their message directories:
//! `SERIES/.store/<id>/` holds one folder's `cur/` and `new/` and their message records
//! (`messages`), as one snapshot made them. Each snapshot's folder has `cur` and `new` symlinks
//! into an entry; a later snapshot of a folder whose directories did not change points at the
//! same entry, which costs two symlinks, not a hard link per message. An entry's records may
//! be written as changes to an older entry's (see [`crate::manifest::part`]). An entry is
//! never changed once written; prune removes those no snapshot names, and the message
//! directories of those kept only for their records.
//!
//! A snapshot may have passed through other hands: only a link that is exactly what we make
//! (`../` up to the series, then `.store/<id>/cur` or `new`) is followed, each component of it
//! opened without following anything further.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fsx::{self, Dir, FsError, ReadFile};
use crate::maildir::Subdir;

pub const STORE_DIR: &str = ".store";
/// An entry's message records (the manifest's, for its folder).
pub const PART_NAME: &str = "messages";
/// Held (flock) by a snapshot while it runs and by prune while it removes entries, so that an
/// entry a running snapshot takes over is never removed under it.
const LOCK_NAME: &str = ".lock";
const ID_LEN: usize = 32;
/// Directories opened at once by one reader.
const OPEN_DIRS: usize = 64;

fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// What the symlink `sub` of the backup folder at `folder` ("" for INBOX) holds to reach
/// entry `id`: as many `../` as lead from the folder up to the series.
pub fn link_target(folder: &str, id: &str, sub: Subdir) -> PathBuf {
    let depth = Path::new(folder).components().count() + 1;
    PathBuf::from(format!("{}{STORE_DIR}/{id}/{}", "../".repeat(depth), sub.as_str()))
}

/// The entry a symlink names, if it is exactly what `link_target` makes.
fn id_in(target: &Path, folder: &str, sub: Subdir) -> Option<String> {
    let s = target.to_str()?;
    let depth = Path::new(folder).components().count() + 1;
    let rest = s.strip_prefix(&"../".repeat(depth))?.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let (id, tail) = rest.split_once('/')?;
    (is_id(id) && tail == sub.as_str()).then(|| id.to_string())
}

/// The store of `series`, made (0700) if missing.
fn store_dir(series: &Dir) -> Result<Dir, FsError> {
    Ok(series.ensure_dir(STORE_DIR, 0o700, None)?.0)
}

/// Holds the store of `series` (waiting for it if `wait`); None if busy and not waiting.
pub fn lock(series: &Dir, wait: bool) -> Result<Option<File>, FsError> {
    lock_in(&store_dir(series)?, wait)
}

/// Holds `store` (see `lock`). A lock file root makes in a mail user's series is given to the
/// store's owner: their next snapshot must be able to take it.
fn lock_in(store: &Dir, wait: bool) -> Result<Option<File>, FsError> {
    let held = store.lock_file(LOCK_NAME, wait)?;
    if let (Some(f), true) = (&held, fsx::running_as_root()) {
        let owner = store.stat()?.owner();
        fsx::set_owner(f, owner).map_err(|e| FsError::Io { op: "chown", path: store.show(LOCK_NAME), source: e })?;
    }
    Ok(held)
}

/// A new, empty entry in the store of `series`: its id and directory.
pub fn create_entry(series: &Dir) -> Result<(String, Dir), FsError> {
    let store = store_dir(series)?;
    loop {
        let id = format!("{}{}", fsx::random_hex(), fsx::random_hex());
        // mkdir fails on a name that exists: an entry is never shared by accident.
        if store.mkdir(&id, 0o700)? {
            return Ok((id.clone(), store.sub(&id)?));
        }
    }
}

/// Entry `id` of the store of `series`.
pub fn open_entry(series: &Dir, id: &str) -> Result<Dir, FsError> {
    if !is_id(id) {
        return Err(FsError::BadName { path: series.show(STORE_DIR).join(id), why: "not a store entry name" });
    }
    series.sub(STORE_DIR)?.sub(id)
}

/// The store entries the snapshots of a series need: those their folders link to, and the
/// bases the records of those are written against, of which only the records are needed.
pub struct InUse {
    pub linked: HashSet<String>,
    pub bases: HashSet<String>,
}

/// Removes every entry of the store of `series` that `in_use` (asked while no snapshot can
/// start or finish) does not name, and the message directories of those needed only as
/// bases: they may hold mail deleted long ago, which a prune must not keep. Returns how many
/// entries it removed; None, and nothing removed, while a snapshot runs in the series.
pub fn remove_unused<E: From<FsError>>(series: &Dir, in_use: impl FnOnce() -> Result<InUse, E>) -> Result<Option<usize>, E> {
    let Some(store) = series.sub_opt(STORE_DIR)? else { return Ok(Some(0)) };
    let Some(_held) = lock_in(&store, false)? else { return Ok(None) };
    let in_use = in_use()?;
    let mut removed = 0;
    for e in store.list()? {
        let Some(id) = e.name.to_str().filter(|n| is_id(n)) else { continue };
        if in_use.linked.contains(id) {
            continue;
        }
        if in_use.bases.contains(id) {
            let entry = store.sub(id)?;
            Subdir::ALL.iter().try_for_each(|sub| entry.remove_tree(sub.as_str()))?;
        } else {
            store.remove_tree(id)?;
            removed += 1;
        }
    }
    Ok(Some(removed))
}

/// The message directories of one backup, opened as needed: each folder's own `cur/` and
/// `new/`, or, in a repository snapshot, the store entries its links name.
pub struct MessageDirs {
    backup: Dir,
    open: Mutex<HashMap<(String, Subdir), Arc<Dir>>>,
}

impl MessageDirs {
    pub fn new(backup: &Dir) -> Result<MessageDirs, FsError> {
        Ok(MessageDirs { backup: backup.try_clone()?, open: Mutex::new(HashMap::new()) })
    }

    /// The `sub` directory of the backup folder `folder`; None if it has none.
    pub fn get(&self, folder: &str, sub: Subdir) -> Result<Option<Arc<Dir>>, FsError> {
        let key = (folder.to_string(), sub);
        if let Some(d) = self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Some(d.clone()));
        }
        let Some(d) = message_dir(&self.backup, folder, sub)? else { return Ok(None) };
        let d = Arc::new(d);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= OPEN_DIRS {
            open.clear(); // keep the number of open descriptors small
        }
        open.insert(key, d.clone());
        Ok(Some(d))
    }

    /// Opens the message file `name` in `sub` of `folder`.
    pub fn open_message(&self, folder: &str, sub: Subdir, name: &str) -> Result<ReadFile, FsError> {
        match self.get(folder, sub)? {
            Some(d) => d.open_read(name),
            None => Err(FsError::Io { op: "open", path: self.backup.show(Path::new(folder).join(sub.as_str())), source: std::io::ErrorKind::NotFound.into() }),
        }
    }
}

/// The `sub` directory of the backup folder `folder` in `backup`: a directory there, or the
/// store entry our symlink there names; None if there is neither.
pub fn message_dir(backup: &Dir, folder: &str, sub: Subdir) -> Result<Option<Dir>, FsError> {
    let rel = Path::new(folder).join(sub.as_str());
    match backup.lstat(&rel)? {
        None => Ok(None),
        Some(m) if m.kind() == fsx::Kind::Symlink => {
            let fdir = backup.sub(folder)?;
            let target = fdir.read_link(sub.as_str())?.unwrap_or_default();
            let id = id_in(&target, folder, sub).ok_or_else(|| FsError::Symlink { path: backup.show(&rel) })?;
            Ok(Some(open_entry(&backup.parent()?, &id)?.sub(sub.as_str())?))
        }
        Some(_) => backup.sub(&rel).map(Some),
    }
}

/// Points the message directories of the staged folder `fdir` (at `folder` in its backup) at
/// entry `id`.
pub fn link_folder(fdir: &Dir, folder: &str, id: &str) -> Result<(), FsError> {
    for sub in Subdir::ALL {
        fdir.symlink(&link_target(folder, id, sub), sub.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_links_name_an_entry() {
        let id = "0123456789abcdef0123456789abcdef";
        for (folder, sub) in [("", Subdir::Cur), (".Sent", Subdir::New), ("Archive/2024", Subdir::Cur)] {
            let t = link_target(folder, id, sub);
            assert_eq!(id_in(&t, folder, sub).as_deref(), Some(id), "{}", t.display());
            // One level too few or too many, or the other directory: not ours.
            assert_eq!(id_in(&t, &format!("{folder}/x"), sub), None);
            assert_eq!(id_in(&t, "", if sub == Subdir::Cur { Subdir::New } else { Subdir::Cur }), None);
        }
        for bad in ["../.store/../../etc/cur", "/tmp/.store/0123456789abcdef0123456789abcdef/cur", "../.store/0123456789ABCDEF0123456789ABCDEF/cur", "../.store/0123/cur", "../.store/0123456789abcdef0123456789abcdef/cur/"] {
            assert_eq!(id_in(Path::new(bad), "", Subdir::Cur), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod hostile_tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::test_support::tmp;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    /// A series whose snapshot `snap` has INBOX's cur linked to entry `ID`, holding a message.
    fn series() -> tempfile::TempDir {
        let t = tmp();
        std::fs::create_dir_all(t.path().join("snap")).unwrap();
        std::fs::create_dir_all(t.path().join(STORE_DIR).join(ID).join("cur")).unwrap();
        std::fs::write(t.path().join(STORE_DIR).join(ID).join("cur").join("m"), b"mail").unwrap();
        symlink(link_target("", ID, Subdir::Cur), t.path().join("snap").join("cur")).unwrap();
        t
    }

    fn open(t: &tempfile::TempDir) -> Result<Option<Dir>, FsError> {
        message_dir(&Dir::open(&t.path().join("snap")).unwrap(), "", Subdir::Cur)
    }

    #[test]
    fn our_link_is_followed_into_the_series_store() {
        let t = series();
        assert!(open(&t).unwrap().unwrap().open_read("m").is_ok());
    }

    #[test]
    fn a_link_we_did_not_make_is_never_followed() {
        let secret = tmp();
        std::fs::create_dir(secret.path().join("cur")).unwrap();
        for target in [secret.path().join("cur"), PathBuf::from("../../../etc"), PathBuf::from(format!("../{STORE_DIR}/{ID}/../{ID}/cur"))] {
            let t = series();
            std::fs::remove_file(t.path().join("snap").join("cur")).unwrap();
            symlink(&target, t.path().join("snap").join("cur")).unwrap();
            assert!(matches!(open(&t), Err(FsError::Symlink { .. })), "{} was followed", target.display());
        }
        // The entry, or its cur/, replaced by a symlink: not followed either.
        let t = series();
        let cur = t.path().join(STORE_DIR).join(ID).join("cur");
        std::fs::remove_dir_all(&cur).unwrap();
        symlink(secret.path().join("cur"), &cur).unwrap();
        assert!(open(&t).unwrap_err().is_planted());
        let t = series();
        let entry = t.path().join(STORE_DIR).join(ID);
        std::fs::rename(&entry, t.path().join("elsewhere")).unwrap();
        symlink(t.path().join("elsewhere"), &entry).unwrap();
        assert!(open(&t).unwrap_err().is_planted());
    }
}
