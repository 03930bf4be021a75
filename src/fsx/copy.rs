//! Copying one regular file between open descriptors the way a backup must: bounded by the
//! size it had when opened, BLAKE3 computed on the way, mode, times and owner set on the
//! descriptor. (Sparse files never get here: `Dir::open_read` refuses them.)

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Write};

use super::{apply, Owner, ReadFile};

const BUF_SIZE: usize = 256 * 1024;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_SIZE]);
}

/// What a copy read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub size: u64,
    pub blake3: String,
}

/// Which side failed: reading the source or writing the copy.
#[derive(Debug)]
pub enum CopyFail {
    Source(io::Error),
    Dest(io::Error),
}

/// Copies `src` into the new, empty file `dst` and gives it `src`'s mode (without set-id
/// bits), times and, if given, `owner`. `size` is what was copied: the file's size when
/// opened, or less if it shrank meanwhile (never more if it grew).
pub fn copy_file(src: &mut ReadFile, dst: &File, owner: Option<Owner>) -> Result<Copied, CopyFail> {
    let mut out = dst;
    let (size, blake3) = stream(src, |chunk| out.write_all(chunk).map_err(CopyFail::Dest))?;
    apply(dst, &src.meta, owner).map_err(CopyFail::Dest)?;
    Ok(Copied { size, blake3 })
}

/// Size and BLAKE3 of an open file, read up to the size it had when opened (a file someone
/// keeps appending to cannot keep us reading).
pub fn hash_file(f: &mut ReadFile) -> io::Result<(u64, String)> {
    stream(f, |_| Ok(())).map_err(|fail| match fail {
        CopyFail::Source(e) | CopyFail::Dest(e) => e,
    })
}

/// Reads `src` up to the size it had when opened, hashing it and handing each chunk to `sink`.
fn stream(src: &ReadFile, mut sink: impl FnMut(&[u8]) -> Result<(), CopyFail>) -> Result<(u64, String), CopyFail> {
    let mut hasher = blake3::Hasher::new();
    let mut input = (&src.file).take(src.meta.size());
    let mut size = 0u64;
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyFail::Source(e)),
            };
            hasher.update(&buf[..n]);
            sink(&buf[..n])?;
            size += n as u64;
        }
    })?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}
