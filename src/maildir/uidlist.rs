//! Dovecot's `dovecot-uidlist` (version 3): a header `3 V<uidvalidity> N<next uid> G<guid> ...`
//! then one line per message, `<uid> [<ext fields>] :<unique name>`.
//!
//! Read as a stream, never whole: a uidlist can be large, and one planted by a hostile owner
//! can be anything. Files over `UIDLIST_LIMIT` are refused before a byte is read.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};

use thiserror::Error;

use crate::fsx::{Dir, FsError};

pub const UIDLIST: &str = "dovecot-uidlist";
/// Far above what a million-message folder needs (about 100 bytes a message).
pub const UIDLIST_LIMIT: u64 = 128 << 20;
/// Longest line accepted (Dovecot's lines are a few hundred bytes).
const LINE_LIMIT: u64 = 64 * 1024;

#[derive(Debug, Error)]
pub enum UidlistError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: line {line}: {what}")]
    Syntax { path: String, line: usize, what: String },
}

impl UidlistError {
    pub fn exit_code(&self) -> i32 {
        match self {
            UidlistError::Fs(e) => e.exit_code(),
            UidlistError::Syntax { .. } => crate::sysexits::EX_DATAERR,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidEntry {
    pub uid: u32,
    /// The unique part of the message's file name.
    pub unique: String,
}

/// The first line of a uidlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The line as written (kept verbatim for the manifest).
    pub line: String,
    pub uid_validity: Option<u32>,
    pub next_uid: Option<u32>,
}

impl Header {
    pub fn parse(line: &str, origin: &str) -> Result<Header, UidlistError> {
        let syntax = |what: String| UidlistError::Syntax { path: origin.to_string(), line: 1, what };
        let mut fields = line.split(' ');
        let version: u32 = fields.next().and_then(|v| v.parse().ok()).ok_or_else(|| syntax("no version".into()))?;
        if version != 3 {
            return Err(syntax(format!("unsupported uidlist version {version} (Dovecot 2.x writes 3)")));
        }
        let (mut uid_validity, mut next_uid) = (None, None);
        for f in fields {
            if let Some(v) = f.strip_prefix('V') {
                uid_validity = v.parse().ok();
            } else if let Some(v) = f.strip_prefix('N') {
                next_uid = v.parse().ok();
            }
        }
        Ok(Header { line: line.to_string(), uid_validity, next_uid })
    }

    /// The same header with the next UID set to `next`.
    pub fn with_next_uid(&self, next: u32) -> String {
        let fields: Vec<String> =
            self.line.split(' ').map(|p| if p.starts_with('N') { format!("N{next}") } else { p.to_string() }).collect();
        fields.join(" ")
    }
}

/// An open uidlist: its header, then its entries one at a time.
pub struct Reader {
    pub header: Header,
    input: BufReader<std::io::Take<File>>,
    origin: String,
    line_no: usize,
}

impl Reader {
    /// Opens `dovecot-uidlist` in `dir`; None if there is none.
    pub fn open(dir: &Dir) -> Result<Option<Reader>, UidlistError> {
        let Some(f) = dir.open_read_opt(UIDLIST)? else { return Ok(None) };
        if f.meta.size() > UIDLIST_LIMIT {
            return Err(FsError::TooBig { path: f.path, size: f.meta.size(), limit: UIDLIST_LIMIT, what: "a dovecot-uidlist" }.into());
        }
        let origin = f.path.display().to_string();
        Reader::new(f.file.take(UIDLIST_LIMIT), origin).map(Some)
    }

    fn new(input: std::io::Take<File>, origin: String) -> Result<Reader, UidlistError> {
        let mut input = BufReader::new(input);
        let line = read_line(&mut input, &origin, 1)?.ok_or_else(|| UidlistError::Syntax { path: origin.clone(), line: 1, what: "empty file".into() })?;
        let header = Header::parse(&line, &origin)?;
        Ok(Reader { header, input, origin, line_no: 1 })
    }

    /// The rest of the file after the header, unparsed (to copy it as it is).
    pub fn into_rest(self) -> impl Read {
        self.input
    }
}

impl Iterator for Reader {
    type Item = Result<UidEntry, UidlistError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line_no += 1;
            let line = match read_line(&mut self.input, &self.origin, self.line_no) {
                Ok(Some(l)) => l,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            if line.is_empty() {
                continue;
            }
            return Some(parse_entry(&line).ok_or_else(|| UidlistError::Syntax {
                path: self.origin.clone(),
                line: self.line_no,
                what: "expected '<uid> [fields] :<file name>'".into(),
            }));
        }
    }
}

fn parse_entry(line: &str) -> Option<UidEntry> {
    let (left, name) = line.split_once(" :")?;
    let uid: u32 = left.split(' ').next()?.parse().ok()?;
    let unique = super::MessageName { full: name }.unique().to_string();
    Some(UidEntry { uid, unique })
}

/// One line without its newline, at most LINE_LIMIT bytes; None at the end.
fn read_line(input: &mut impl BufRead, origin: &str, line_no: usize) -> Result<Option<String>, UidlistError> {
    let mut buf = Vec::new();
    let n = input.take(LINE_LIMIT + 1).read_until(b'\n', &mut buf).map_err(|e| FsError::Io { op: "read", path: origin.into(), source: e })?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if n as u64 > LINE_LIMIT {
        return Err(UidlistError::Syntax { path: origin.to_string(), line: line_no, what: format!("line longer than {LINE_LIMIT} bytes") });
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v3() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(UIDLIST), "3 V1700000000 N3 G0123abcd\n1 :a.M1P1.h,S=10\n\n2 W12 :b.M2P2.h,S=20:2,S\n").unwrap();
        let r = Reader::open(&Dir::open(t.path()).unwrap()).unwrap().unwrap();
        assert_eq!((r.header.uid_validity, r.header.next_uid), (Some(1700000000), Some(3)));
        assert_eq!(r.header.with_next_uid(9), "3 V1700000000 N9 G0123abcd");
        let entries: Vec<UidEntry> = r.map(Result::unwrap).collect();
        assert_eq!(entries, vec![UidEntry { uid: 1, unique: "a.M1P1.h,S=10".into() }, UidEntry { uid: 2, unique: "b.M2P2.h,S=20".into() }]);
        assert!(Header::parse("1 2 3", "t").is_err());
        std::fs::write(t.path().join(UIDLIST), format!("3 V1 N2\n{}\n", "9".repeat(70_000))).unwrap();
        let mut r = Reader::open(&Dir::open(t.path()).unwrap()).unwrap().unwrap();
        assert!(matches!(r.next(), Some(Err(UidlistError::Syntax { line: 2, .. }))));
    }
}
