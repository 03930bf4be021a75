//! Copying one regular file between open descriptors the way a backup must: bounded by the
//! size it had when opened, holes kept as holes (a hostile owner's sparse file costs us what
//! it costs her), BLAKE3 computed on the way, mode, times and owner set on the descriptor.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use super::{apply, Owner, ReadFile};

const BUF_SIZE: usize = 256 * 1024;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_SIZE]);
}

/// What a copy read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub size: u64,
    pub blake3: String,
    /// Bytes left as holes (0 unless the source was sparse).
    pub holes: u64,
}

/// Which side failed: reading the source or writing the copy.
#[derive(Debug)]
pub enum CopyFail {
    Source(io::Error),
    Dest(io::Error),
}

/// Copies `src` into the new, empty file `dst` and gives it `src`'s mode (without set-id
/// bits), times and, if given, `owner`.
pub fn copy_file(src: &mut ReadFile, dst: &File, owner: Option<Owner>) -> Result<Copied, CopyFail> {
    let size = src.meta.size();
    let mut hasher = blake3::Hasher::new();
    // Fewer blocks than bytes: maybe sparse (or compressed); ask where the data is.
    let holes = if src.meta.allocated() < size {
        copy_sparse(&src.file, dst, size, &mut hasher)?
    } else {
        copy_dense(&src.file, dst, 0, size, &mut hasher)?;
        0
    };
    apply(dst, &src.meta, owner).map_err(CopyFail::Dest)?;
    Ok(Copied { size, blake3: hasher.finalize().to_hex().to_string(), holes })
}

/// Copies bytes `[from, to)` (fewer if the file is shorter) to the same offsets of `dst`.
fn copy_dense(src: &File, dst: &File, from: u64, to: u64, hasher: &mut blake3::Hasher) -> Result<u64, CopyFail> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut pos = from;
        while pos < to {
            let want = (to - pos).min(buf.len() as u64) as usize;
            let n = match src.read_at(&mut buf[..want], pos) {
                Ok(0) => break, // shorter than it said: it shrank (it cannot, for Maildir files)
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyFail::Source(e)),
            };
            hasher.update(&buf[..n]);
            dst.write_all_at(&buf[..n], pos).map_err(CopyFail::Dest)?;
            pos += n as u64;
        }
        Ok(pos - from)
    })
}

/// Copies the data regions only; the holes become holes in `dst` (its length set last).
fn copy_sparse(src: &File, dst: &File, size: u64, hasher: &mut blake3::Hasher) -> Result<u64, CopyFail> {
    let mut pos = 0u64;
    let mut holes = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d.min(size),
            Err(Errno::NXIO) => size, // only a hole from here on
            Err(Errno::INVAL) => pos, // no SEEK_DATA here: treat the rest as data
            Err(e) => return Err(CopyFail::Source(e.into())),
        };
        hash_zeros(hasher, data - pos);
        holes += data - pos;
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data)).map(|h| h.min(size)).unwrap_or(size);
        copy_dense(src, dst, data, hole, hasher)?;
        pos = hole;
    }
    rustix::fs::ftruncate(dst, size).map_err(|e| CopyFail::Dest(e.into()))?;
    Ok(holes)
}

fn hash_zeros(hasher: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Size and BLAKE3 of an open file, read up to the size it had when opened (a file someone
/// keeps appending to cannot keep us reading).
pub fn hash_file(f: &mut ReadFile) -> io::Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut input = (&f.file).take(f.meta.size());
    BUF.with(|buf| -> io::Result<()> {
        let mut buf = buf.borrow_mut();
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
        }
    })?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}
