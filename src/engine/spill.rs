//! Folders' entries kept on disk while nothing changes them: after the bulk copy a folder's
//! entries go to a scratch file in the staging directory, and come back when a pass finds the
//! folder changed, or when its records are written. So a backup holds the entries of the
//! folders it is working on, not of the whole Maildir (a million messages took hundreds of
//! megabytes).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::entries::{Entries, Entry};
use super::BackupError;
use crate::fsx::Dir;
use crate::maildir::Subdir;

/// Where a folder's entries are in the scratch file, and what they add up to.
#[derive(Debug, Clone, Copy)]
pub struct Spilled {
    offset: u64,
    len: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// The scratch file (nameless, ours alone), written at its end only.
pub struct Spill {
    file: File,
    end: u64,
    path: PathBuf,
}

const CUR: u8 = 1;
const CHECKSUM: u8 = 2;
const OWN_KEY: u8 = 4;

impl Spill {
    /// A scratch file in `dir`; None where the file system cannot make a nameless one (then
    /// entries stay in memory).
    pub fn new(dir: &Dir) -> Result<Option<Spill>, BackupError> {
        let path = dir.path().join("(scratch file)");
        Ok(dir.scratch_file()?.map(|file| Spill { file, end: 0, path }))
    }

    fn err(&self, op: &'static str) -> impl Fn(io::Error) -> BackupError + '_ {
        move |source| BackupError::Io { op, path: self.path.clone(), source }
    }

    /// Appends `entries`, sorted by place and name (the order of a folder's records, which are
    /// read from here one at a time: see `entries`); returns where they are.
    pub fn write(&mut self, entries: &Entries) -> Result<Spilled, BackupError> {
        let offset = self.end;
        self.file.seek(SeekFrom::Start(offset)).map_err(self.err("seek"))?;
        let mut out = BufWriter::new(&self.file);
        let (mut messages, mut bytes) = (0, 0);
        let mut sorted: Vec<(&str, &Entry)> = entries.iter().collect();
        sorted.sort_by(|(_, a), (_, b)| a.place().cmp(&b.place()));
        for (key, e) in sorted {
            encode(&mut out, key, e).map_err(self.err("write"))?;
            messages += 1;
            bytes += e.size;
        }
        out.flush().map_err(self.err("write"))?;
        drop(out);
        self.end = self.file.stream_position().map_err(self.err("seek"))?;
        Ok(Spilled { offset, len: self.end - offset, messages, bytes })
    }

    /// The entries written at `at`.
    pub fn read(&self, at: &Spilled) -> Result<Entries, BackupError> {
        let mut entries = Entries::default();
        entries.reserve(at.messages as usize);
        for keyed in self.decoded(at) {
            let (key, e) = keyed?;
            entries.insert_keyed(key, e);
        }
        Ok(entries)
    }

    /// The entries written at `at`, one at a time, sorted by place and name.
    pub fn entries(&self, at: &Spilled) -> impl Iterator<Item = Result<Entry, BackupError>> + '_ {
        self.decoded(at).map(|keyed| keyed.map(|(_, e)| e))
    }

    /// The entries written at `at` and their keys, one at a time.
    fn decoded(&self, at: &Spilled) -> impl Iterator<Item = Result<(Option<String>, Entry), BackupError>> + '_ {
        let mut input = BufReader::new(Region { file: &self.file, pos: at.offset, end: at.offset + at.len });
        (0..at.messages).map(move |_| decode(&mut input).map_err(self.err("read")))
    }
}

/// One entry: flags, size, checksum (if any), name, and its key where that is not the name's
/// unique part.
fn encode(out: &mut impl Write, key: &str, e: &Entry) -> io::Result<()> {
    let own_key = Entries::key_of(e) != Some(key);
    let flags = if e.sub == Subdir::Cur { CUR } else { 0 } | if e.blake3.is_some() { CHECKSUM } else { 0 } | if own_key { OWN_KEY } else { 0 };
    out.write_all(&[flags])?;
    out.write_all(&e.size.to_le_bytes())?;
    if let Some(h) = e.blake3 {
        out.write_all(h.as_bytes())?;
    }
    put_str(out, &e.name)?;
    if own_key {
        put_str(out, key)?;
    }
    Ok(())
}

fn put_str(out: &mut impl Write, s: &str) -> io::Result<()> {
    let len = u16::try_from(s.len()).map_err(|_| io::Error::other("a name longer than 65535 bytes"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(s.as_bytes())
}

fn decode(input: &mut impl Read) -> io::Result<(Option<String>, Entry)> {
    let mut flags = [0u8];
    input.read_exact(&mut flags)?;
    let mut size = [0u8; 8];
    input.read_exact(&mut size)?;
    let blake3 = if flags[0] & CHECKSUM != 0 {
        let mut h = [0u8; 32];
        input.read_exact(&mut h)?;
        Some(blake3::Hash::from_bytes(h))
    } else {
        None
    };
    let name = get_str(input)?.into_boxed_str();
    let key = if flags[0] & OWN_KEY != 0 { Some(get_str(input)?) } else { None };
    let sub = if flags[0] & CUR != 0 { Subdir::Cur } else { Subdir::New };
    Ok((key, Entry { sub, name, size: u64::from_le_bytes(size), blake3 }))
}

fn get_str(input: &mut impl Read) -> io::Result<String> {
    let mut len = [0u8; 2];
    input.read_exact(&mut len)?;
    let mut s = vec![0u8; u16::from_le_bytes(len) as usize];
    input.read_exact(&mut s)?;
    String::from_utf8(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a name that is not UTF-8 in the scratch file"))
}

/// A stretch of a file, read with `pread` (several folders may be read side by side).
struct Region<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for Region<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_as_they_went() {
        let dir = tempfile::tempdir().unwrap();
        let Some(mut spill) = Spill::new(&Dir::open(dir.path()).unwrap()).unwrap() else {
            eprintln!("no O_TMPFILE on this file system: entries stay in memory");
            return;
        };
        let mut a = Entries::default();
        a.insert("1.M1P1.h".into(), Entry { sub: Subdir::Cur, name: "1.M1P1.h:2,S".into(), size: 7, blake3: Some(blake3::hash(b"a")) });
        a.insert("\0dup:1.M1P1.h:2,".into(), Entry { sub: Subdir::Cur, name: "1.M1P1.h:2,".into(), size: 8, blake3: None });
        a.insert("2.M2P2.h".into(), Entry { sub: Subdir::New, name: "2.M2P2.h".into(), size: 9, blake3: None });
        let b = Entries::default();
        let (at_a, at_b) = (spill.write(&a).unwrap(), spill.write(&b).unwrap());
        assert_eq!((at_a.messages, at_a.bytes, at_b.messages), (3, 24, 0));
        let back = spill.read(&at_a).unwrap();
        let sorted = |es: &Entries| {
            let mut v: Vec<(String, Entry)> = es.iter().map(|(k, e)| (k.to_string(), e.clone())).collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        assert_eq!(sorted(&back), sorted(&a));
        assert_eq!(spill.read(&at_b).unwrap().len(), 0);
        // One at a time, by place and name.
        let names: Vec<String> = spill.entries(&at_a).map(|e| e.unwrap().name.into()).collect();
        assert_eq!(names, ["1.M1P1.h:2,", "1.M1P1.h:2,S", "2.M2P2.h"]);
    }
}
