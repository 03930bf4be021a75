//! Copying one file the way a backup must: never through a symlink, never over an existing
//! file, with mode, owner (when root) and times kept, hashing the bytes on the way.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{futimens, utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

const BUF_SIZE: usize = 256 * 1024;

/// What a copy found out about the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub size: u64,
    pub blake3: String,
    pub mtime: i64,
}

/// Which of the two failed: reading the source or writing the copy. A source that vanished
/// is a normal event in a live Maildir; a destination error is fatal.
#[derive(Debug)]
pub enum CopyError {
    SourceVanished,
    Source(io::Error),
    Dest(io::Error),
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_SIZE]);
}

pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Opens a file for reading without following a symlink.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Copies `src` to the new file `dst` (which must not exist).
pub fn copy_file(src: &Path, dst: &Path, keep_owner: bool) -> Result<Copied, CopyError> {
    let mut input = match open_nofollow(src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CopyError::SourceVanished),
        Err(e) => return Err(CopyError::Source(e)),
    };
    let md = input.metadata().map_err(CopyError::Source)?;
    if !md.is_file() {
        return Err(CopyError::Source(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .map_err(CopyError::Dest)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    BUF.with(|buf| -> Result<(), CopyError> {
        let mut buf = buf.borrow_mut();
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Source(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(CopyError::Dest)?;
            size += n as u64;
        }
    })?;
    apply_metadata(&out, &md, keep_owner).map_err(CopyError::Dest)?;
    Ok(Copied { size, blake3: hasher.finalize().to_hex().to_string(), mtime: md.mtime() })
}

/// Gives `out` the mode, owner (if asked) and times of `md`.
pub fn apply_metadata(out: &File, md: &std::fs::Metadata, keep_owner: bool) -> io::Result<()> {
    if keep_owner {
        nix::unistd::fchown(out.as_raw_fd(), Some(md.uid().into()), Some(md.gid().into())).map_err(io::Error::from)?;
    }
    // After chown: chown may clear set-id bits.
    out.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
    futimens(out.as_raw_fd(), &TimeSpec::new(md.atime(), md.atime_nsec()), &TimeSpec::new(md.mtime(), md.mtime_nsec()))
        .map_err(io::Error::from)
}

/// Gives the directory `dir` the mode, owner and times of `md` (done last, after its contents).
pub fn apply_dir_metadata(dir: &Path, md: &std::fs::Metadata, keep_owner: bool) -> io::Result<()> {
    if keep_owner {
        nix::unistd::fchownat(None, dir, Some(md.uid().into()), Some(md.gid().into()), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io::Error::from)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
    utimensat(
        None,
        dir,
        &TimeSpec::new(md.atime(), md.atime_nsec()),
        &TimeSpec::new(md.mtime(), md.mtime_nsec()),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Hashes a file (for verify and paranoid checks).
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = open_nofollow(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    BUF.with(|buf| -> io::Result<()> {
        let mut buf = buf.borrow_mut();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
    })?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}
