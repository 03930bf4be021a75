//! The file layer: every access to a Maildir, a snapshot, a staging directory or a restore
//! target goes through a [`Dir`], an open directory descriptor.
//!
//! Root runs us over trees whose owners may be hostile and may race us, so nothing here acts
//! on a path string inside a directory someone else can write:
//! * paths the admin gave are opened one component at a time ([`Dir::open`]); a symlink on
//!   the way is followed only where the directory holding it is writable by nobody but root
//!   (or us), so `/var/mail -> /srv/mail` works and `~alice/Maildir -> ~bob/Maildir` does not;
//! * below that, everything is relative to the descriptor: `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS)` where the kernel has it, else one `O_NOFOLLOW` open per component;
//!   renames, links and unlinks only ever name one component in an open directory;
//! * only regular files are read: opened `O_NONBLOCK|O_NOFOLLOW`, then `fstat`ed, so a FIFO
//!   or a device never blocks us; sizes are bounded by the caller ([`Dir::read_small`]);
//! * files are created `O_EXCL|O_NOFOLLOW` (temp names random), owners and modes set on the
//!   descriptor, set-id bits never copied; replacing renames only where replacing is meant.

mod copy;
mod meta;
mod name;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

pub use copy::{copy_file, hash_file, Copied, CopyFail};
pub use meta::{apply, running_as_root, safe_mode, set_mode, set_mtime, set_owner, DirStamp, Kind, Meta, Owner};
pub use name::{check_name, check_rel, has_control, NAME_MAX, PATH_MAX};

/// What went wrong, always with the path (for the admin) and the operation. Paths are shown
/// with control characters escaped: names come from users who may want to forge log lines.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{op} {}: {source}", shown(path))]
    Io { op: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error("{} is or passes through a symlink; symlinks are never followed", shown(path))]
    Symlink { path: PathBuf },
    #[error("{} is a symlink in a directory others can write ({}); give the real path", shown(path), shown(dir))]
    UntrustedSymlink { path: PathBuf, dir: PathBuf },
    #[error("{} is {}, not a regular file; not read", shown(path), .kind.describe())]
    NotRegular { path: PathBuf, kind: Kind },
    #[error("{} is sparse ({size} bytes, of which {holes} are holes): nothing we copy is, so it is not read", shown(path))]
    Sparse { path: PathBuf, size: u64, holes: u64 },
    #[error("{} is {size} bytes, over the limit of {limit} bytes for {what}", shown(path))]
    TooBig { path: PathBuf, size: u64, limit: u64, what: &'static str },
    #[error("{}: unsafe name: {why}", shown(path))]
    BadName { path: PathBuf, why: &'static str },
}

/// A path for a message: control characters (newlines, escape sequences) escaped.
pub fn shown(path: &Path) -> String {
    let s = path.to_string_lossy();
    if !has_control(&s) {
        return s.into_owned();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

impl FsError {
    fn io(op: &'static str, path: PathBuf, e: impl Into<io::Error>) -> FsError {
        let source = e.into();
        if source.raw_os_error() == Some(libc::ELOOP) {
            return FsError::Symlink { path };
        }
        FsError::Io { op, path, source }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The errno of a plain I/O error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            FsError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True for what a hostile owner can put in place of a file or directory we wanted: a
    /// symlink, a FIFO, a socket, a device, a sparse or far too big file, a file where a
    /// directory should be. Callers skip it with a warning.
    pub fn is_planted(&self) -> bool {
        matches!(self, FsError::Symlink { .. } | FsError::NotRegular { .. } | FsError::Sparse { .. } | FsError::TooBig { .. })
            || self.errno() == Some(libc::ENOTDIR)
    }

    pub fn exit_code(&self) -> i32 {
        use crate::sysexits;
        match self {
            FsError::Io { source, .. } => sysexits::for_io_error(source),
            FsError::Symlink { .. } | FsError::NotRegular { .. } | FsError::Sparse { .. } | FsError::TooBig { .. } | FsError::BadName { .. } => {
                sysexits::EX_DATAERR
            }
            FsError::UntrustedSymlink { .. } => sysexits::EX_NOPERM,
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// Whether renames that must not replace anything may replace a name that is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    Never,
    Allowed,
}

/// A regular file opened for reading, with its `fstat`.
pub struct ReadFile {
    pub file: File,
    pub meta: Meta,
    pub path: PathBuf,
}

/// An entry of a directory listing; `kind` from the listing (or `lstat` where the file system
/// does not say).
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: OsString,
    pub kind: Kind,
}

/// An open directory. `path` is only for messages: nothing ever opens it again by name.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);
const READ_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::NOFOLLOW).union(OFlags::NONBLOCK).union(OFlags::NOCTTY).union(OFlags::CLOEXEC);
/// Symlinks make `openat2` fail closed (ELOOP); never leaves the starting directory.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);
/// Hops through trusted symlinks before giving up (the kernel's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;

/// Set once the kernel said it has no `openat2` (before 5.6): walk components instead.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

fn mode(m: u32) -> Mode {
    Mode::from_raw_mode(m as _)
}

/// A directory holding a symlink we may follow: only root (or we) can change it.
fn trusted(md: &Meta) -> bool {
    let owner_ok = md.owner().uid == 0 || md.owner().uid == rustix::process::geteuid().as_raw();
    owner_ok && md.mode() & 0o022 == 0
}

/// 16 random hex digits, for names made unique by `O_EXCL` or `mkdir`.
pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Uniqueness still comes from O_EXCL: a clash only costs another try.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        b = (t ^ u64::from(std::process::id())).to_ne_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Dir {
    /// Opens a directory the admin named (absolute, or relative to the working directory).
    /// Symlinks on the way are followed only inside directories nobody else can write.
    pub fn open(path: &Path) -> Result<Dir> {
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| FsError::io("find working directory for", path.to_path_buf(), e))?.join(path)
        };
        let root = || rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty());
        let mut cur: OwnedFd = root().map_err(|e| FsError::io("open", "/".into(), e))?;
        let mut shown = PathBuf::from("/");
        // Components still to walk, last first; a followed symlink pushes its target's.
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, &abs);
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            if comp.is_empty() || comp == "." {
                continue;
            }
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&cur, comp.as_os_str(), flags, Mode::empty()) {
                Ok(fd) => {
                    cur = fd;
                    shown = if comp == ".." { shown.parent().map(Path::to_path_buf).unwrap_or(shown) } else { shown.join(&comp) };
                }
                Err(e) if e == Errno::LOOP || e == Errno::NOTDIR => {
                    let here = shown.join(&comp);
                    let st = rustix::fs::statat(&cur, comp.as_os_str(), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| FsError::io("lstat", here.clone(), e))?;
                    if Meta(st).kind() != Kind::Symlink {
                        return Err(FsError::io("open directory", abs, Errno::NOTDIR));
                    }
                    let dir_md = Meta(rustix::fs::fstat(&cur).map_err(|e| FsError::io("stat", shown.clone(), e))?);
                    if !trusted(&dir_md) {
                        return Err(FsError::UntrustedSymlink { path: here, dir: shown });
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(FsError::io("resolve", here, Errno::LOOP));
                    }
                    let target = rustix::fs::readlinkat(&cur, comp.as_os_str(), Vec::new()).map_err(|e| FsError::io("read symlink", here.clone(), e))?;
                    let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        cur = root().map_err(|e| FsError::io("open", "/".into(), e))?;
                        shown = PathBuf::from("/");
                    }
                    push_components(&mut todo, &target);
                }
                Err(e) => return Err(FsError::io("open directory", abs, e)),
            }
        }
        let fd = rustix::fs::openat(&cur, ".", DIR_FLAGS, Mode::empty()).map_err(|e| FsError::io("open directory", abs.clone(), e))?;
        Ok(Dir { fd, path: abs })
    }

    /// `Dir::open`, or None if the directory does not exist.
    pub fn open_opt(path: &Path) -> Result<Option<Dir>> {
        match Dir::open(path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the admin-named directory `path`, creating it (and missing parents, each with
    /// `mode` and `owner`) if it is not there. True if `path` itself was created.
    pub fn open_or_create(path: &Path, mode: u32, owner: Option<Owner>) -> Result<(Dir, bool)> {
        if let Some(d) = Dir::open_opt(path)? {
            return Ok((d, false));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(FsError::io("open directory", path.to_path_buf(), Errno::NOENT));
        };
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let (p, _) = Dir::open_or_create(parent, mode, owner)?;
        p.ensure_dir(Path::new(name), mode, owner)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/rel`, for messages.
    pub fn show(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        if rel.as_os_str().is_empty() { self.path.clone() } else { self.path.join(rel) }
    }

    /// `/proc/self/fd/N`: the directory itself, for APIs that only take a path (inotify).
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    fn check(&self, rel: &Path) -> Result<()> {
        check_rel(rel).map_err(|why| FsError::BadName { path: self.show(rel), why })
    }

    /// Opens `rel` below this directory with `flags`, never through a symlink and never
    /// outside it.
    fn open_beneath(&self, rel: &Path, flags: OFlags, m: u32) -> Result<OwnedFd> {
        match self.open_beneath_raw(rel, flags, m) {
            // O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: say what it really is.
            Err(e) if e.errno() == Some(libc::ENOTDIR) && !rel.as_os_str().is_empty() => match self.lstat(rel) {
                Ok(Some(md)) if md.kind() == Kind::Symlink => Err(FsError::Symlink { path: self.show(rel) }),
                Err(e2 @ FsError::Symlink { .. }) => Err(e2),
                _ => Err(e),
            },
            r => r,
        }
    }

    fn open_beneath_raw(&self, rel: &Path, flags: OFlags, m: u32) -> Result<OwnedFd> {
        self.check(rel)?;
        let rel: &Path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let op = if flags.contains(OFlags::CREATE) { "create" } else { "open" };
        if !rel.as_os_str().as_bytes().contains(&b'/') {
            // One component: O_NOFOLLOW is all it takes.
            return rustix::fs::openat(&self.fd, rel, flags | OFlags::NOFOLLOW, mode(m)).map_err(|e| FsError::io(op, self.show(rel), e));
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(&self.fd, rel, flags | OFlags::NOFOLLOW, mode(m), BENEATH) {
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                r => return r.map_err(|e| FsError::io(op, self.show(rel), e)),
            }
        }
        let mut parts = rel.as_os_str().as_bytes().split(|&c| c == b'/').peekable();
        let mut cur: Option<OwnedFd> = None;
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            let f = if last { flags | OFlags::NOFOLLOW } else { OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC };
            let at = cur.as_ref().map_or(self.fd.as_fd(), |c| c.as_fd());
            let fd = rustix::fs::openat(at, OsStr::from_bytes(part), f, mode(m)).map_err(|e| FsError::io(op, self.show(rel), e))?;
            cur = Some(fd);
        }
        cur.ok_or_else(|| FsError::io(op, self.show(rel), Errno::INVAL))
    }

    /// The directory `rel` below this one ("" = this one, opened anew).
    pub fn sub(&self, rel: impl AsRef<Path>) -> Result<Dir> {
        let rel = rel.as_ref();
        let fd = self.open_beneath(rel, DIR_FLAGS, 0)?;
        Ok(Dir { fd, path: self.show(rel) })
    }

    /// `sub`, or None if it does not exist.
    pub fn sub_opt(&self, rel: impl AsRef<Path>) -> Result<Option<Dir>> {
        match self.sub(rel) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The directory this one is in (`..`, which no symlink can redirect).
    pub fn parent(&self) -> Result<Dir> {
        let path = self.path.parent().map_or_else(|| self.path.join(".."), Path::to_path_buf);
        let fd = rustix::fs::openat(&self.fd, "..", DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty()).map_err(|e| FsError::io("open", path.clone(), e))?;
        Ok(Dir { fd, path })
    }

    pub fn try_clone(&self) -> Result<Dir> {
        self.sub("")
    }

    /// The directory holding `rel`, and `rel`'s last component.
    fn parent_of<'a>(&'a self, rel: &'a Path) -> Result<(Parent<'a>, &'a OsStr)> {
        self.check(rel)?;
        let name = rel.file_name().ok_or_else(|| FsError::BadName { path: self.show(rel), why: "no file name" })?;
        match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            None => Ok((Parent::Same(self), name)),
            Some(p) => Ok((Parent::Owned(self.sub(p)?), name)),
        }
    }

    pub fn stat(&self) -> Result<Meta> {
        rustix::fs::fstat(&self.fd).map(Meta).map_err(|e| FsError::io("stat", self.path.clone(), e))
    }

    /// The parent of `rel` and its last component; None if the parent does not exist.
    fn parent_opt<'a>(&'a self, rel: &'a Path) -> Result<Option<(Parent<'a>, &'a OsStr)>> {
        match self.parent_of(rel) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `lstat` of `rel` (a symlink is reported, not followed; "" is this directory); None if
    /// it does not exist.
    pub fn lstat(&self, rel: impl AsRef<Path>) -> Result<Option<Meta>> {
        let rel = rel.as_ref();
        if rel.as_os_str().is_empty() {
            return self.stat().map(Some);
        }
        let Some((dir, name)) = self.parent_opt(rel)? else { return Ok(None) };
        match rustix::fs::statat(dir.fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta(st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(FsError::io("lstat", self.show(rel), e)),
        }
    }

    /// True if this directory has been removed since we opened it.
    pub fn is_removed(&self) -> bool {
        self.stat().is_ok_and(|m| m.nlink() == 0)
    }

    /// The entries of this directory (without `.` and `..`).
    pub fn list(&self) -> Result<Vec<Entry>> {
        let err = |e| FsError::io("read directory", self.path.clone(), e);
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            let mut kind = Kind::from_file_type(entry.file_type());
            if kind == Kind::Unknown {
                // Some file systems do not say in the listing.
                match rustix::fs::statat(&self.fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => kind = Meta(st).kind(),
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(FsError::io("lstat", self.show(&name), e)),
                }
            }
            out.push(Entry { name, kind });
        }
        Ok(out)
    }

    /// Opens the regular file `rel` for reading. A FIFO, socket or device is refused without
    /// blocking (`FsError::NotRegular`), a symlink without being followed, a sparse file (which
    /// costs its owner nothing and us a read of every hole) with `FsError::Sparse`.
    pub fn open_read(&self, rel: impl AsRef<Path>) -> Result<ReadFile> {
        let rel = rel.as_ref();
        let path = self.show(rel);
        let fd = match self.open_beneath(rel, READ_FLAGS, 0) {
            Ok(fd) => fd,
            // A socket cannot be opened at all; say what it is.
            Err(FsError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENXIO) => {
                let kind = self.lstat(rel)?.map_or(Kind::Unknown, |m| m.kind());
                return Err(FsError::NotRegular { path, kind });
            }
            Err(e) => return Err(e),
        };
        let meta = Meta(rustix::fs::fstat(&fd).map_err(|e| FsError::io("fstat", path.clone(), e))?);
        if !meta.is_file() {
            return Err(FsError::NotRegular { path, kind: meta.kind() });
        }
        // Fewer blocks than bytes: maybe compressed or inline, maybe sparse; only a hole says.
        if meta.allocated() < meta.size() {
            let data_end = match rustix::fs::seek(&fd, rustix::fs::SeekFrom::Hole(0)) {
                Ok(h) => h,
                Err(Errno::INVAL) | Err(Errno::NXIO) => meta.size(), // no SEEK_HOLE here
                Err(e) => return Err(FsError::io("seek", path, e)),
            };
            if data_end < meta.size() {
                let holes = meta.size().saturating_sub(meta.allocated());
                return Err(FsError::Sparse { path, size: meta.size(), holes });
            }
            rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)).map_err(|e| FsError::io("seek", path.clone(), e))?;
        }
        Ok(ReadFile { file: File::from(fd), meta, path })
    }

    /// `open_read`, or None if there is no such file.
    pub fn open_read_opt(&self, rel: impl AsRef<Path>) -> Result<Option<ReadFile>> {
        match self.open_read(rel) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a small regular file whole; `FsError::TooBig` past `limit` bytes. None if absent.
    pub fn read_small(&self, rel: impl AsRef<Path>, limit: u64, what: &'static str) -> Result<Option<Vec<u8>>> {
        let Some(mut f) = self.open_read_opt(rel)? else { return Ok(None) };
        if f.meta.size() > limit {
            return Err(FsError::TooBig { path: f.path, size: f.meta.size(), limit, what });
        }
        let mut buf = Vec::with_capacity(f.meta.size() as usize);
        (&mut f.file).take(limit + 1).read_to_end(&mut buf).map_err(|e| FsError::io("read", f.path.clone(), e))?;
        if buf.len() as u64 > limit {
            return Err(FsError::TooBig { path: f.path, size: buf.len() as u64, limit, what });
        }
        Ok(Some(buf))
    }

    /// Creates the new file `rel` (never through a symlink, never over anything).
    pub fn create(&self, rel: impl AsRef<Path>, m: u32) -> Result<File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        self.open_beneath(rel.as_ref(), flags, m).map(File::from)
    }

    /// Creates a new file with a random name `<prefix>.<random>` in this directory.
    pub fn create_temp(&self, prefix: &str, m: u32) -> Result<(String, File)> {
        for _ in 0..16 {
            let name = format!("{prefix}.{}", random_hex());
            match self.create(&name, m) {
                Ok(f) => return Ok((name, f)),
                Err(e) if e.errno() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(FsError::io("create temporary file in", self.path.clone(), Errno::EXIST))
    }

    /// A new file without a name in this directory (`O_TMPFILE`), for reading and writing: no
    /// name to open it by, and gone once closed. None where the file system cannot make one.
    pub fn scratch_file(&self) -> Result<Option<File>> {
        let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.fd, ".", flags, mode(0o600)) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => Ok(None),
            Err(e) => Err(FsError::io("create a scratch file in", self.path.clone(), e)),
        }
    }

    /// Replaces `name` the way Dovecot replaces its control files: a new file with a random
    /// name, written by `fill`, given `mode` and `owner`, flushed, renamed over `name`; then
    /// the directory flushed. A symlink at `name` is replaced, never followed.
    pub fn replace_file(&self, name: &str, m: u32, owner: Option<Owner>, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
        let (tmp, mut f) = self.create_temp(&format!(".{name}.maildir-backup"), 0o600)?;
        let result = (|| {
            let err = |op| { let p = self.show(&tmp); move |e| FsError::io(op, p, e) };
            fill(&mut f).map_err(err("write"))?;
            if let Some(o) = owner {
                set_owner(&f, o).map_err(err("chown"))?;
            }
            set_mode(&f, m).map_err(err("chmod"))?;
            f.sync_all().map_err(err("fsync"))?;
            self.rename(&tmp, self, name, Replace::Allowed)?;
            self.sync()
        })();
        if result.is_err() {
            let _ = self.unlink(&tmp);
        }
        result
    }

    /// Opens the existing regular file `rel` to append to it.
    pub fn open_append(&self, rel: impl AsRef<Path>) -> Result<File> {
        let rel = rel.as_ref();
        let fd = self.open_beneath(rel, OFlags::WRONLY | OFlags::APPEND | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC, 0)?;
        let md = Meta(rustix::fs::fstat(&fd).map_err(|e| FsError::io("fstat", self.show(rel), e))?);
        if !md.is_file() {
            return Err(FsError::NotRegular { path: self.show(rel), kind: md.kind() });
        }
        Ok(File::from(fd))
    }

    /// Creates the directory `rel` with `mode` (exactly, whatever the umask); false if
    /// something is already there.
    pub fn mkdir(&self, rel: impl AsRef<Path>, m: u32) -> Result<bool> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent_of(rel)?;
        match rustix::fs::mkdirat(dir.fd(), name, mode(m)) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Ok(false),
            Err(e) => return Err(FsError::io("create directory", self.show(rel), e)),
        }
        // The umask may have taken bits away; put them back on the new directory itself.
        let d = self.sub(rel)?;
        set_mode(&d.fd, m).map_err(|e| FsError::io("chmod", self.show(rel), e))?;
        Ok(true)
    }

    /// Opens the directory `rel`, creating it with `mode` and `owner` if it is not there;
    /// true if it was created.
    pub fn ensure_dir(&self, rel: impl AsRef<Path>, m: u32, owner: Option<Owner>) -> Result<(Dir, bool)> {
        let rel = rel.as_ref();
        let created = self.mkdir(rel, m)?;
        let d = self.sub(rel)?;
        if let (true, Some(o)) = (created, owner) {
            set_owner(&d.fd, o).map_err(|e| FsError::io("chown", d.path.clone(), e))?;
        }
        Ok((d, created))
    }

    /// Opens `rel`, creating each missing component with `mode` and `owner`.
    pub fn ensure_dirs(&self, rel: impl AsRef<Path>, m: u32, owner: Option<Owner>) -> Result<Dir> {
        let rel = rel.as_ref();
        self.check(rel)?;
        let mut cur = self.try_clone()?;
        for part in rel.iter() {
            cur = cur.ensure_dir(Path::new(part), m, owner)?.0;
        }
        Ok(cur)
    }

    /// Renames `from` here to `to` in `to_dir`. With `Replace::Never` nothing at `to` is ever
    /// replaced (`RENAME_NOREPLACE`, or link-then-unlink where the file system lacks it).
    pub fn rename(&self, from: impl AsRef<Path>, to_dir: &Dir, to: impl AsRef<Path>, replace: Replace) -> Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        let (fd, fname) = self.parent_of(from)?;
        let (td, tname) = to_dir.parent_of(to)?;
        let err = |e| FsError::io("rename", self.show(from), e);
        if replace == Replace::Allowed {
            return rustix::fs::renameat(fd.fd(), fname, td.fd(), tname).map_err(err);
        }
        match rustix::fs::renameat_with(fd.fd(), fname, td.fd(), tname, RenameFlags::NOREPLACE) {
            Err(Errno::INVAL) | Err(Errno::NOSYS) => {
                // No RENAME_NOREPLACE here (NFS): link() never replaces either (files only:
                // directories go through `rename_dir_noreplace`).
                rustix::fs::linkat(fd.fd(), fname, td.fd(), tname, AtFlags::empty()).map_err(err)?;
                rustix::fs::unlinkat(fd.fd(), fname, AtFlags::empty()).map_err(err)
            }
            r => r.map_err(err),
        }
    }

    /// Renames a directory `from` to `to` in the same directory, never replacing anything.
    /// Only for directories the admin owns (the publish of a backup).
    pub fn rename_dir_noreplace(&self, from: &OsStr, to: &OsStr) -> Result<()> {
        self.check_one(from)?;
        self.check_one(to)?;
        let err = |e| FsError::io("rename", self.show(from), e);
        match rustix::fs::renameat_with(&self.fd, from, &self.fd, to, RenameFlags::NOREPLACE) {
            Err(Errno::INVAL) | Err(Errno::NOSYS) => {
                if self.lstat(Path::new(to))?.is_some() {
                    return Err(FsError::io("rename", self.show(to), Errno::EXIST));
                }
                rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(err)
            }
            r => r.map_err(err),
        }
    }

    /// Hard-links `from` here as `to` in `to_dir` (a symlink is linked as itself, never followed).
    pub fn link(&self, from: impl AsRef<Path>, to_dir: &Dir, to: impl AsRef<Path>) -> Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        let (fd, fname) = self.parent_of(from)?;
        let (td, tname) = to_dir.parent_of(to)?;
        rustix::fs::linkat(fd.fd(), fname, td.fd(), tname, AtFlags::empty()).map_err(|e| FsError::io("link", self.show(from), e))
    }

    /// Gives the open file `f` a new random name `<prefix>.<random>` here: the very file we
    /// hold, whatever names point where by now.
    pub fn link_open_file(&self, f: &File, prefix: &str) -> Result<String> {
        for _ in 0..16 {
            let name = format!("{prefix}.{}", random_hex());
            self.check_one(OsStr::new(&name))?;
            match link_fd(f, self.fd.as_fd(), OsStr::new(&name)) {
                Ok(()) => return Ok(name),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(FsError::io("link", self.show(&name), e)),
            }
        }
        Err(FsError::io("link into", self.path.clone(), Errno::EXIST))
    }

    /// Gives the open file `f` the name `rel` here (EEXIST if it is taken): the very file we
    /// hold and checked, whatever names point where by now.
    pub fn link_file(&self, f: &File, rel: impl AsRef<Path>) -> Result<()> {
        let rel = rel.as_ref();
        let (dir, name) = self.parent_of(rel)?;
        link_fd(f, dir.fd(), name).map_err(|e| FsError::io("link", self.show(rel), e))
    }

    /// The mount this directory is on (its device where the kernel cannot say, before 5.8):
    /// a hard link never crosses one.
    pub fn mount_id(&self) -> Result<u64> {
        use rustix::fs::{statx, StatxFlags};
        match statx(&self.fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID) {
            Ok(st) if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) => Ok(st.stx_mnt_id),
            Ok(st) => Ok(u64::from(st.stx_dev_major) << 32 | u64::from(st.stx_dev_minor)),
            Err(e) => Err(FsError::io("statx", self.path.clone(), e)),
        }
    }

    /// Removes the file (or symlink) `rel`; false if it was not there.
    pub fn unlink(&self, rel: impl AsRef<Path>) -> Result<bool> {
        let rel = rel.as_ref();
        let Some((dir, name)) = self.parent_opt(rel)? else { return Ok(false) };
        match rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(FsError::io("remove", self.show(rel), e)),
        }
    }

    /// Removes the empty directory `rel`; false if it was not there or not empty.
    pub fn rmdir(&self, rel: impl AsRef<Path>) -> Result<bool> {
        let rel = rel.as_ref();
        let Some((dir, name)) = self.parent_opt(rel)? else { return Ok(false) };
        match rustix::fs::unlinkat(dir.fd(), name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) | Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(FsError::io("remove directory", self.show(rel), e)),
        }
    }

    /// Checks that `name` is one entry of this directory.
    fn check_one(&self, name: &OsStr) -> Result<()> {
        check_name(name).map_err(|why| FsError::BadName { path: self.show(name), why })
    }

    /// Removes the entry `name` and everything below it, descending only through real
    /// directories.
    /// An exclusive flock on the file `name` here (made, 0600, if missing), held until the file
    /// is dropped; None if someone else holds it and `wait` is false.
    pub fn lock_file(&self, name: impl AsRef<Path>, wait: bool) -> Result<Option<File>> {
        let name = name.as_ref();
        let file = match self.create(name, 0o600) {
            Err(e) if e.errno() == Some(libc::EEXIST) => self.open_append(name)?,
            r => r?,
        };
        let op = if wait { FlockOperation::LockExclusive } else { FlockOperation::NonBlockingLockExclusive };
        match rustix::fs::flock(&file, op) {
            Ok(()) => Ok(Some(file)),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(FsError::io("flock", self.show(name), e)),
        }
    }

    /// Makes a directory of ours that its mode keeps us from changing (e.g. 0500) ours to
    /// empty: root needs no such help, and anyone else's is left as it is.
    fn make_removable(&self) -> Result<()> {
        if running_as_root() {
            return Ok(());
        }
        let md = self.stat()?;
        if md.owner().uid == rustix::process::geteuid().as_raw() && md.mode() & 0o300 != 0o300 {
            self.set_mode(md.mode() | 0o700)?;
        }
        Ok(())
    }

    pub fn remove_tree(&self, name: impl AsRef<Path>) -> Result<()> {
        let name = name.as_ref();
        self.check_one(name.as_os_str())?;
        match self.lstat(name)? {
            None => return Ok(()),
            Some(md) if !md.is_dir() => {
                self.unlink(name)?;
                return Ok(());
            }
            Some(_) => {}
        }
        struct Level {
            dir: Dir,
            name: OsString,
            left: Vec<Entry>,
        }
        let top = self.sub(name)?;
        top.make_removable()?;
        let left = top.list()?;
        // Depth first with an explicit stack, so a deep tree cannot overflow ours.
        let mut stack = vec![Level { dir: top, name: name.as_os_str().to_os_string(), left }];
        while let Some(level) = stack.last_mut() {
            match level.left.pop() {
                Some(e) if e.kind == Kind::Dir => {
                    let dir = level.dir.sub(Path::new(&e.name))?;
                    dir.make_removable()?;
                    let left = dir.list()?;
                    stack.push(Level { dir, name: e.name, left });
                }
                Some(e) => {
                    level.dir.unlink(Path::new(&e.name))?;
                }
                None => {
                    let done = stack.pop().expect("the loop saw it");
                    let parent = stack.last().map_or(self, |l| &l.dir);
                    match rustix::fs::unlinkat(&parent.fd, done.name.as_os_str(), AtFlags::REMOVEDIR) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(FsError::io("remove directory", done.dir.path.clone(), e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// The target of the symlink `name`; None if there is no such symlink.
    pub fn read_link(&self, name: &str) -> Result<Option<PathBuf>> {
        self.check_one(OsStr::new(name))?;
        match rustix::fs::readlinkat(&self.fd, name, Vec::new()) {
            Ok(t) => Ok(Some(PathBuf::from(OsStr::from_bytes(t.as_bytes())))),
            Err(Errno::NOENT) | Err(Errno::INVAL) => Ok(None),
            Err(e) => Err(FsError::io("read symlink", self.show(name), e)),
        }
    }

    /// Creates the symlink `name` -> `target` (never followed by us; for `latest`).
    pub fn symlink(&self, target: &Path, name: &str) -> Result<()> {
        self.check_one(OsStr::new(name))?;
        rustix::fs::symlinkat(target, &self.fd, name).map_err(|e| FsError::io("create symlink", self.show(name), e))
    }

    /// Sets `name`'s times to now (without following a symlink).
    pub fn touch(&self, name: &str) -> Result<()> {
        self.check_one(OsStr::new(name))?;
        let now = rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW };
        rustix::fs::utimensat(&self.fd, name, &rustix::fs::Timestamps { last_access: now, last_modification: now }, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::io("touch", self.show(name), e))
    }

    /// Flushes this directory's entries (after a rename into it).
    pub fn sync(&self) -> Result<()> {
        rustix::fs::fsync(&self.fd).map_err(|e| FsError::io("fsync", self.path.clone(), e))
    }

    /// Flushes the whole file system this directory is on.
    pub fn syncfs(&self) -> Result<()> {
        rustix::fs::syncfs(&self.fd).map_err(|e| FsError::io("syncfs", self.path.clone(), e))
    }

    /// Gives this directory `md`'s permission bits, without write access for group or others
    /// (a backup's directories are never open to everyone), and its times. Owners are left.
    pub fn copy_dir_meta(&self, md: &Meta) -> Result<()> {
        let err = |e| FsError::io("set metadata of", self.path.clone(), e);
        set_mode(&self.fd, md.mode() & 0o755).map_err(err)?;
        rustix::fs::futimens(&self.fd, &md.times()).map_err(|e| err(e.into()))
    }

    /// (device, inode) of this directory and each of its ancestors up to `/`: the physical
    /// path, whatever names lead here.
    pub fn lineage(&self) -> Result<Vec<(u64, u64)>> {
        Ok(self.ancestors()?.iter().map(|m| (m.dev(), m.ino())).collect())
    }

    /// The metadata of this directory and of each of its ancestors up to `/`, nearest first.
    pub fn ancestors(&self) -> Result<Vec<Meta>> {
        let err = |e| FsError::io("find the parent of", self.path.clone(), e);
        let mut out: Vec<Meta> = Vec::new();
        let mut cur = rustix::fs::openat(&self.fd, ".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(err)?;
        loop {
            let m = Meta(rustix::fs::fstat(&cur).map_err(err)?);
            if out.iter().any(|o| (o.dev(), o.ino()) == (m.dev(), m.ino())) {
                return Ok(out); // `/` is its own parent
            }
            out.push(m);
            cur = rustix::fs::openat(&cur, "..", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(err)?;
        }
    }

    pub fn set_owner(&self, o: Owner) -> Result<()> {
        set_owner(&self.fd, o).map_err(|e| FsError::io("chown", self.path.clone(), e))
    }

    pub fn set_mode(&self, m: u32) -> Result<()> {
        set_mode(&self.fd, m).map_err(|e| FsError::io("chmod", self.path.clone(), e))
    }

    /// Refreshes NFS's cached attributes of `name` (a no-op chown, as Dovecot does).
    pub fn nfs_flush(&self, name: &str) {
        if check_name(OsStr::new(name)).is_err() {
            return;
        }
        let _ = rustix::fs::chownat(&self.fd, name, None, None, AtFlags::SYMLINK_NOFOLLOW);
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The directory an operation on a relative path happens in: this one, or one opened below.
enum Parent<'a> {
    Same(&'a Dir),
    Owned(Dir),
}

impl Parent<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Parent::Same(d) => d.fd.as_fd(),
            Parent::Owned(d) => d.fd.as_fd(),
        }
    }
}

/// Links the open file `f` as `name` in `dir`, through /proc/self/fd so that it needs no
/// privilege (`AT_EMPTY_PATH` would need CAP_DAC_READ_SEARCH).
fn link_fd(f: &File, dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
    rustix::fs::linkat(rustix::fs::CWD, proc.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW)
}

fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> =
        path.as_os_str().as_bytes().split(|&c| c == b'/').map(|p| OsStr::from_bytes(p).to_os_string()).collect();
    todo.extend(parts.into_iter().rev());
}

#[cfg(test)]
mod tests;
