//! File metadata as the file layer reads it (`fstat`/`fstatat` without following) and gives it
//! back (`fchown`, then `fchmod`, then `futimens`, always on an open descriptor).

use std::os::fd::AsFd;

use rustix::fs::{FileType, Gid, Mode, Stat, Timespec, Timestamps, Uid};

/// What kind of thing a directory entry or an open descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

impl Kind {
    pub fn from_file_type(t: FileType) -> Kind {
        match t {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            _ => Kind::Unknown,
        }
    }

    /// "a FIFO", "a symlink", … for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device",
            Kind::BlockDevice => "a block device",
            Kind::Unknown => "of an unknown type",
        }
    }
}

/// Who owns a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One `stat` result.
#[derive(Debug, Clone, Copy)]
pub struct Meta(pub(super) Stat);

// `struct stat`'s field types differ between architectures: the casts are not all no-ops.
#[allow(clippy::unnecessary_cast)]
impl Meta {
    pub fn kind(&self) -> Kind {
        Kind::from_file_type(FileType::from_raw_mode(self.0.st_mode as _))
    }
    pub fn is_file(&self) -> bool {
        self.kind() == Kind::File
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == Kind::Dir
    }
    pub fn size(&self) -> u64 {
        self.0.st_size as u64
    }
    /// Bytes the file system really holds for it (less than `size` for a sparse file).
    pub fn allocated(&self) -> u64 {
        (self.0.st_blocks as u64).saturating_mul(512)
    }
    /// Permission and set-id bits.
    pub fn mode(&self) -> u32 {
        self.0.st_mode as u32 & 0o7777
    }
    pub fn owner(&self) -> Owner {
        Owner { uid: self.0.st_uid as u32, gid: self.0.st_gid as u32 }
    }
    pub fn dev(&self) -> u64 {
        self.0.st_dev as u64
    }
    pub fn ino(&self) -> u64 {
        self.0.st_ino as u64
    }
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink as u64
    }
    pub fn mtime(&self) -> i64 {
        self.0.st_mtime as i64
    }
    pub fn mtime_nsec(&self) -> i64 {
        self.0.st_mtime_nsec as i64
    }
    pub fn ctime(&self) -> i64 {
        self.0.st_ctime as i64
    }
    pub fn ctime_nsec(&self) -> i64 {
        self.0.st_ctime_nsec as i64
    }
    #[allow(clippy::unnecessary_cast)]
    pub(super) fn times(&self) -> Timestamps {
        Timestamps {
            last_access: Timespec { tv_sec: self.0.st_atime as _, tv_nsec: self.0.st_atime_nsec as _ },
            last_modification: Timespec { tv_sec: self.0.st_mtime as _, tv_nsec: self.0.st_mtime_nsec as _ },
        }
    }
}

/// A directory's identity and change times: if these are unchanged (and were not fresh when
/// taken), nothing was created, renamed or removed in it since. The change time is kept too:
/// an owner can set a directory's mtime back, never its ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DirStamp {
    pub ino: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl DirStamp {
    pub fn of(md: &Meta) -> DirStamp {
        DirStamp { ino: md.ino(), mtime: md.mtime(), mtime_nsec: md.mtime_nsec(), ctime: md.ctime(), ctime_nsec: md.ctime_nsec() }
    }

    /// Whether the last change it records came over a second before `listed_ns` (Unix time in
    /// nanoseconds): then a later change cannot share its time stamp (the kernel's file times
    /// tick coarsely, and may lag the clock we read).
    pub fn settled_before(&self, listed_ns: i128) -> bool {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        ns(self.mtime, self.mtime_nsec).max(ns(self.ctime, self.ctime_nsec)) + 1_000_000_000 < listed_ns
    }
}

/// True when we run as root: only then are owners kept (and only then do they matter).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Permission bits a copy may carry: never set-uid, set-gid or sticky, which in a backup or
/// a restored Maildir could only serve an attacker.
pub fn safe_mode(mode: u32) -> u32 {
    mode & 0o777
}

/// Gives the open file or directory `fd` an owner (if asked), then `md`'s permission bits
/// (without set-id bits) and times. The order matters: chown clears set-id bits, and both
/// would change the ctime but not the times we set last.
pub fn apply<Fd: AsFd>(fd: Fd, md: &Meta, owner: Option<Owner>) -> std::io::Result<()> {
    if let Some(o) = owner {
        set_owner(&fd, o)?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(safe_mode(md.mode()) as _))?;
    rustix::fs::futimens(&fd, &md.times())?;
    Ok(())
}

pub fn set_owner<Fd: AsFd>(fd: Fd, o: Owner) -> std::io::Result<()> {
    // u32::MAX (-1) would mean "leave unchanged" to the kernel: never an owner we copy.
    if o.uid == u32::MAX || o.gid == u32::MAX {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "owner id -1"));
    }
    Ok(rustix::fs::fchown(fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid)))?)
}

pub fn set_mode<Fd: AsFd>(fd: Fd, mode: u32) -> std::io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(safe_mode(mode) as _))?)
}

/// Sets the modification (and access) time of an open file to `secs`.
pub fn set_mtime<Fd: AsFd>(fd: Fd, secs: i64) -> std::io::Result<()> {
    let t = Timespec { tv_sec: secs as _, tv_nsec: 0 };
    Ok(rustix::fs::futimens(fd, &Timestamps { last_access: t, last_modification: t })?)
}
