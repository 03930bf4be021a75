//! Dovecot's `dovecot-uidlist` (version 3): a header `3 V<uidvalidity> N<next uid> G<guid> ...`
//! then one line per message, `<uid> [<ext fields>] :<unique name>`.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum UidlistError {
    #[error("read {path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    #[error("{path}: line {line}: {what}")]
    Syntax { path: String, line: usize, what: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidEntry {
    pub uid: u32,
    pub unique: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uidlist {
    /// The header line as written (kept verbatim for the manifest).
    pub header: String,
    pub version: u32,
    pub uid_validity: Option<u32>,
    pub next_uid: Option<u32>,
    pub entries: Vec<UidEntry>,
}

impl Uidlist {
    pub fn read(path: &Path) -> Result<Uidlist, UidlistError> {
        let text = std::fs::read(path).map_err(|e| UidlistError::Io { path: path.display().to_string(), source: e })?;
        Uidlist::parse(&String::from_utf8_lossy(&text), &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Uidlist, UidlistError> {
        let syntax = |line: usize, what: &str| UidlistError::Syntax { path: origin.to_string(), line, what: what.to_string() };
        let mut lines = text.lines();
        let header = lines.next().ok_or_else(|| syntax(1, "empty file"))?.to_string();
        let mut fields = header.split(' ');
        let version: u32 = fields.next().and_then(|v| v.parse().ok()).ok_or_else(|| syntax(1, "no version"))?;
        if version != 3 {
            return Err(syntax(1, &format!("unsupported uidlist version {version} (Dovecot 2.x writes 3)")));
        }
        let (mut uid_validity, mut next_uid) = (None, None);
        for f in fields {
            if let Some(v) = f.strip_prefix('V') {
                uid_validity = v.parse().ok();
            } else if let Some(v) = f.strip_prefix('N') {
                next_uid = v.parse().ok();
            }
        }
        let mut entries = Vec::new();
        for (i, line) in lines.enumerate() {
            if line.is_empty() {
                continue;
            }
            let (left, unique) = line.split_once(" :").ok_or_else(|| syntax(i + 2, "no ' :' before the file name"))?;
            let uid: u32 = left.split(' ').next().and_then(|u| u.parse().ok()).ok_or_else(|| syntax(i + 2, "bad uid"))?;
            entries.push(UidEntry { uid, unique: unique.to_string() });
        }
        Ok(Uidlist { header, version, uid_validity, next_uid, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v3() {
        let u = Uidlist::parse("3 V1700000000 N3 G0123abcd\n1 :a.M1P1.h,S=10\n2 W12 :b.M2P2.h,S=20\n", "t").unwrap();
        assert_eq!(u.uid_validity, Some(1700000000));
        assert_eq!(u.next_uid, Some(3));
        assert_eq!(u.entries.len(), 2);
        assert_eq!(u.entries[1], UidEntry { uid: 2, unique: "b.M2P2.h,S=20".into() });
        assert!(Uidlist::parse("1 2 3\n", "t").is_err());
    }
}
