//! Writing a backup where nobody can see it until it is whole: a staging directory beside
//! the destination (mode 0700, guarded by our own dot-lock), published with one `rename()`
//! that never replaces anything. A run that dies leaves `.<name>.maildir-backup-staging`; the
//! next run for the same destination removes it.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::dotlock::{DotLock, LockError, LockFile, LockSettings};
use crate::fsx::{Dir, FsError};
use crate::sysexits;

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("destination {0} already exists; a backup is never written over anything")]
    DestExists(PathBuf),
    #[error("destination {0} has no usable file name")]
    BadDest(PathBuf),
    #[error("another backup into {dest} is running ({lock})")]
    Busy { dest: PathBuf, lock: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl StagingError {
    pub fn exit_code(&self) -> i32 {
        use crate::sysexits::ExitCode;
        match self {
            StagingError::DestExists(_) => sysexits::EX_CANTCREAT,
            StagingError::Busy { .. } => sysexits::EX_TEMPFAIL,
            StagingError::BadDest(_) => sysexits::EX_USAGE,
            StagingError::Fs(e) => e.exit_code(),
            StagingError::Lock(e) => e.exit_code(),
        }
    }
}

/// How long a new run waits for the guard of an earlier run on the same destination.
const GUARD_WAIT: Duration = Duration::from_secs(3);
pub const STAGING_SUFFIX: &str = ".maildir-backup-staging";

pub struct Staging {
    parent: Arc<Dir>,
    dest: OsString,
    name: OsString,
    dir: Dir,
    _guard: DotLock,
    published: bool,
}

/// Mode of the directories made on the way to a destination: like a repository's, for the
/// eyes of whoever runs the backup.
const PARENT_MODE: u32 = 0o700;

/// `dest`'s parent, opened (and made first if missing, like `mkdir -p`), and `dest`'s name
/// in it.
pub fn split_dest(dest: &Path) -> Result<(Dir, OsString), StagingError> {
    let name = dest.file_name().filter(|n| *n != "..").ok_or_else(|| StagingError::BadDest(dest.to_path_buf()))?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (parent, _) = Dir::open_or_create(parent, PARENT_MODE, None)?;
    Ok((parent, name.to_os_string()))
}

/// `.<name>.maildir-backup-staging`
pub fn staging_name_for(dest: &OsStr) -> OsString {
    let mut s = OsString::from(".");
    s.push(dest);
    s.push(STAGING_SUFFIX);
    s
}

impl Staging {
    /// Claims `dest` in `parent`: it must not exist. Removes a staging dir left by a dead run.
    pub fn prepare(parent: &Dir, dest: &OsStr) -> Result<Staging, StagingError> {
        let shown = parent.show(dest);
        crate::fsx::check_name(dest).map_err(|_| StagingError::BadDest(shown.clone()))?;
        if parent.lstat(Path::new(dest))?.is_some() {
            return Err(StagingError::DestExists(shown));
        }
        let name = staging_name_for(dest);
        let name_str = name.to_str().ok_or_else(|| StagingError::BadDest(shown.clone()))?.to_string();
        let parent = Arc::new(parent.try_clone()?);
        // Only one run per destination. A dead run's guard names a dead pid and is broken,
        // once it is older than the 2 s in which pids are not judged: wait that long.
        let set = LockSettings { timeout: GUARD_WAIT, stale_timeout: Duration::ZERO, ..LockSettings::default() };
        let guard = match DotLock::acquire_in(&parent, &name_str, &set) {
            Ok(g) => g,
            Err(LockError::Timeout { .. }) => {
                let lock = LockFile { dir: parent.clone(), name: format!("{name_str}.lock") };
                let lock = format!("{} held by {}", lock.path().display(), crate::dotlock::describe_holder(&lock));
                return Err(StagingError::Busy { dest: shown, lock });
            }
            Err(e) => return Err(e.into()),
        };
        parent.remove_tree(&name)?;
        // 0700: nobody but us sees (or changes) a backup in progress.
        parent.mkdir(&name, 0o700)?;
        let dir = parent.sub(&name)?;
        Ok(Staging { parent, dest: dest.to_os_string(), name, dir, _guard: guard, published: false })
    }

    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Flushes everything written to disk, then makes the backup visible with one rename
    /// that never replaces an existing destination.
    pub fn publish(mut self) -> Result<(), StagingError> {
        // One syncfs instead of an fsync per message: the publish is durable, the copy fast.
        self.dir.syncfs()?;
        match self.parent.rename_dir_noreplace(&self.name, &self.dest) {
            Ok(()) => {}
            Err(e) if matches!(e.errno(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => {
                return Err(StagingError::DestExists(self.parent.show(&self.dest)))
            }
            Err(e) => return Err(e.into()),
        }
        self.published = true;
        // Published either way; only its survival of a crash is in doubt.
        if let Err(e) = self.parent.sync() {
            crate::warnings::defer(format!("published {}, but {e}: it may not survive a crash of this machine", self.parent.show(&self.dest).display()));
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = self.parent.remove_tree(&self.name);
        }
    }
}
