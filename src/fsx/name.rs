//! What counts as a safe name: the rules every name and relative path must pass before the
//! file layer uses it, whether it came from a directory listing, a manifest or a command line.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Longest file name Linux file systems accept.
pub const NAME_MAX: usize = 255;
/// Longest relative path we accept (Linux's PATH_MAX).
pub const PATH_MAX: usize = 4096;

/// Why a name is unsafe, for error messages.
pub type Unsafe = &'static str;

/// One path component: not empty, not `.` or `..`, no `/` or NUL, at most NAME_MAX bytes.
pub fn check_name(name: &OsStr) -> Result<(), Unsafe> {
    let b = name.as_bytes();
    if b.is_empty() {
        return Err("empty name");
    }
    if b == b"." || b == b".." {
        return Err("'.' and '..' are not names");
    }
    if b.contains(&b'/') {
        return Err("a name may not contain '/'");
    }
    if b.contains(&0) {
        return Err("a name may not contain NUL");
    }
    if b.len() > NAME_MAX {
        return Err("name longer than 255 bytes");
    }
    Ok(())
}

/// A relative path of safe names (empty = the directory itself): no `..`, no `.`, no empty
/// component, no leading `/`.
pub fn check_rel(rel: &Path) -> Result<(), Unsafe> {
    let b = rel.as_os_str().as_bytes();
    if b.is_empty() {
        return Ok(());
    }
    if b.len() > PATH_MAX {
        return Err("path longer than 4096 bytes");
    }
    if b[0] == b'/' {
        return Err("absolute path where a relative one is required");
    }
    b.split(|&c| c == b'/').try_for_each(|part| check_name(OsStr::from_bytes(part)))
}

/// True if `s` holds a control character (names from a hostile user may carry newlines,
/// escape sequences or NUL; we never write them into reports, manifests or Maildirs).
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        for ok in ["a", ".Sent", "1795546104.M1P2.host,S=1:2,S", "Entw&APw-rfe"] {
            assert!(check_name(OsStr::new(ok)).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_name(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(check_name(OsStr::new(&"x".repeat(256))).is_err());
        for ok in ["", ".Sent", "Archive/2024"] {
            assert!(check_rel(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in ["/etc", "../x", "a/../../b", "./a", "a/./b", "a//b", "a/"] {
            assert!(check_rel(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(has_control("a\nb") && !has_control("Entwürfe"));
    }
}
