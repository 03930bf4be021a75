//! Writing a backup where nobody can see it until it is whole: a staging directory beside
//! the destination, guarded by our own dot-lock, published with one `rename()`.
//! A run that dies leaves `.<name>.maildir-backup-staging`; the next run for the same
//! destination removes it.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dotlock::{DotLock, LockError, LockSettings};

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("destination {0} already exists; a backup is never written over anything")]
    DestExists(PathBuf),
    #[error("destination {0} has no usable file name")]
    BadDest(PathBuf),
    #[error("another backup into {dest} is running ({lock})")]
    Busy { dest: PathBuf, lock: String },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error(transparent)]
    Lock(#[from] LockError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StagingError + 'a {
    move |source| StagingError::Io { op, path: path.to_path_buf(), source }
}

/// How long a new run waits for the guard of an earlier run on the same destination.
const GUARD_WAIT: Duration = Duration::from_secs(3);

pub struct Staging {
    dest: PathBuf,
    dir: PathBuf,
    _guard: DotLock,
    published: bool,
}

/// `.<name>.maildir-backup-staging` beside `dest`.
pub fn staging_dir_for(dest: &Path) -> Result<PathBuf, StagingError> {
    let name = dest.file_name().ok_or_else(|| StagingError::BadDest(dest.to_path_buf()))?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.maildir-backup-staging", name.to_string_lossy())))
}

impl Staging {
    /// Claims `dest`: it must not exist; its parent must. Removes a staging dir left by a
    /// dead run.
    pub fn prepare(dest: &Path) -> Result<Staging, StagingError> {
        if fs::symlink_metadata(dest).is_ok() {
            return Err(StagingError::DestExists(dest.to_path_buf()));
        }
        let dir = staging_dir_for(dest)?;
        let parent = dir.parent().unwrap_or(Path::new("."));
        let md = fs::metadata(parent).map_err(io_err("stat destination's parent", parent))?;
        if !md.is_dir() {
            return Err(StagingError::Io {
                op: "use destination's parent",
                path: parent.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        // Only one run per destination. A dead run's guard names a dead pid and is broken,
        // once it is older than the 2 s in which pids are not judged: wait that long.
        let set = LockSettings { timeout: GUARD_WAIT, stale_timeout: Duration::ZERO, ..LockSettings::default() };
        let guard = match DotLock::acquire(&dir, &set).map(Some).or_else(|e| match e {
            LockError::Timeout { .. } => Ok(None),
            e => Err(e),
        })? {
            Some(g) => g,
            None => {
                let lock = crate::dotlock::lock_path_for(&dir);
                return Err(StagingError::Busy { dest: dest.to_path_buf(), lock: format!("{} held by {}", lock.display(), crate::dotlock::describe_holder(&lock)) });
            }
        };
        match fs::symlink_metadata(&dir) {
            Ok(_) => fs::remove_dir_all(&dir).map_err(io_err("remove leftover staging dir", &dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", &dir)(e)),
        }
        fs::create_dir(&dir).map_err(io_err("create staging dir", &dir))?;
        Ok(Staging { dest: dest.to_path_buf(), dir, _guard: guard, published: false })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes everything written to disk, then makes the backup visible with one rename
    /// that never replaces an existing destination.
    pub fn publish(mut self) -> Result<(), StagingError> {
        let d = fs::File::open(&self.dir).map_err(io_err("open", &self.dir))?;
        // One syncfs instead of an fsync per message: the publish is durable, the copy fast.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io_err("syncfs", &self.dir)(io::Error::last_os_error()));
        }
        drop(d);
        match nix::fcntl::renameat2(None, &self.dir, None, &self.dest, nix::fcntl::RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) | Err(nix::errno::Errno::ENOTEMPTY) => {
                return Err(StagingError::DestExists(self.dest.clone()))
            }
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {
                // Filesystems without RENAME_NOREPLACE (e.g. NFS): check, then rename.
                if fs::symlink_metadata(&self.dest).is_ok() {
                    return Err(StagingError::DestExists(self.dest.clone()));
                }
                fs::rename(&self.dir, &self.dest).map_err(io_err("rename staging dir to", &self.dest))?;
            }
            Err(e) => return Err(io_err("rename staging dir to", &self.dest)(e.into())),
        }
        if let Some(parent) = self.dest.parent() {
            if let Ok(p) = fs::File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) {
                let _ = p.sync_all();
            }
        }
        self.published = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
