//! Exit codes from BSD `sysexits.h`, the convention mail software (and doveadm) uses,
//! so scripts can tell "try again later" (75) from "fix your command line" (64).

use std::io;

pub const EX_OK: i32 = 0;
pub const EX_USAGE: i32 = 64;
pub const EX_DATAERR: i32 = 65;
pub const EX_NOINPUT: i32 = 66;
pub const EX_NOUSER: i32 = 67;
pub const EX_UNAVAILABLE: i32 = 69;
pub const EX_SOFTWARE: i32 = 70;
pub const EX_CANTCREAT: i32 = 73;
pub const EX_IOERR: i32 = 74;
pub const EX_TEMPFAIL: i32 = 75;
pub const EX_NOPERM: i32 = 77;
pub const EX_CONFIG: i32 = 78;

/// The exit code an I/O failure deserves: missing input, permission, or a plain I/O error.
pub fn for_io_error(err: &io::Error) -> i32 {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => EX_NOINPUT,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => EX_NOPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => EX_CANTCREAT,
        _ => EX_IOERR,
    }
}

/// Errors that know which sysexits code they map to.
pub trait ExitCode {
    fn exit_code(&self) -> i32;
}
