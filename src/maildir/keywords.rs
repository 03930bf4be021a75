//! `dovecot-keywords`: which keyword each flag letter `a`..`z` of a folder's file names means,
//! as lines `<index> <keyword>` (index 0 = `a`). Dovecot writes it under the uidlist lock.

use std::collections::BTreeMap;
use std::io::Write;

use crate::fsx::{Dir, FsError, Owner};

/// Dovecot's limit: one letter per keyword.
pub const MAX_KEYWORDS: usize = 26;
pub const KEYWORDS_FILE: &str = "dovecot-keywords";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keywords {
    by_index: BTreeMap<usize, String>,
}

impl Keywords {
    /// Reads a folder's keywords file from its control dir; a missing file means no keywords.
    pub fn read(dir: &Dir) -> Result<Keywords, FsError> {
        let bytes = dir.read_small(KEYWORDS_FILE, super::CONTROL_FILE_LIMIT, "a dovecot-keywords")?;
        Ok(bytes.map(|b| Keywords::parse(&String::from_utf8_lossy(&b))).unwrap_or_default())
    }

    pub fn parse(text: &str) -> Keywords {
        let mut by_index = BTreeMap::new();
        for line in text.lines() {
            let Some((idx, name)) = line.split_once(' ') else { continue };
            let Ok(idx) = idx.parse::<usize>() else { continue };
            if idx < MAX_KEYWORDS && !name.is_empty() && !by_index.values().any(|n| n == name) {
                by_index.insert(idx, name.to_string());
            }
        }
        Keywords { by_index }
    }

    /// The keyword a flag letter stands for.
    pub fn name_of(&self, letter: char) -> Option<&str> {
        let idx = (letter as u32).checked_sub('a' as u32)? as usize;
        self.by_index.get(&idx).map(String::as_str)
    }

    /// The letter for `name`, adding it if there is a free one (None if all 26 are taken).
    pub fn letter_for(&mut self, name: &str) -> Option<char> {
        let idx = match self.by_index.iter().find(|(_, n)| *n == name) {
            Some((&i, _)) => i,
            None => {
                let free = (0..MAX_KEYWORDS).find(|i| !self.by_index.contains_key(i))?;
                self.by_index.insert(free, name.to_string());
                free
            }
        };
        char::from_u32('a' as u32 + idx as u32)
    }

    pub fn to_text(&self) -> String {
        self.by_index.iter().map(|(i, n)| format!("{i} {n}\n")).collect()
    }

    /// Replaces the folder's file as Dovecot does: a new file, flushed, renamed over it; its
    /// modification time `mtime`.
    pub fn write(&self, dir: &Dir, mode: u32, owner: Option<Owner>, mtime: i64) -> Result<(), FsError> {
        dir.replace_file(KEYWORDS_FILE, mode, owner, |f| {
            f.write_all(self.to_text().as_bytes())?;
            crate::fsx::set_mtime(&*f, mtime)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_letters() {
        let mut k = Keywords::parse("0 $Work\n2 Later\nbogus\n");
        assert_eq!(k.name_of('a'), Some("$Work"));
        assert_eq!(k.name_of('b'), None);
        assert_eq!(k.letter_for("Later"), Some('c'));
        assert_eq!(k.letter_for("New"), Some('b'));
        assert_eq!(k.to_text(), "0 $Work\n1 New\n2 Later\n");
    }

    #[test]
    fn written_whole_never_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(t.path().join("victim"), t.path().join(KEYWORDS_FILE)).unwrap();
        let dir = Dir::open(t.path()).unwrap();
        assert!(Keywords::read(&dir).is_err(), "read through a symlink");
        Keywords::parse("0 $Work\n").write(&dir, 0o600, None, 1_700_000_000).unwrap();
        assert_eq!(std::fs::read(t.path().join("victim")).unwrap(), b"keep");
        assert_eq!(Keywords::read(&dir).unwrap().name_of('a'), Some("$Work"));
    }
}
