//! `dovecot-keywords`: which keyword each flag letter `a`..`z` of a folder's file names means,
//! as lines `<index> <keyword>` (index 0 = `a`). Dovecot writes it under the uidlist lock.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Dovecot's limit: one letter per keyword.
pub const MAX_KEYWORDS: usize = 26;
pub const KEYWORDS_FILE: &str = "dovecot-keywords";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keywords {
    by_index: BTreeMap<usize, String>,
}

impl Keywords {
    /// Reads a folder's keywords file; a missing file means no keywords.
    pub fn read(path: &Path) -> io::Result<Keywords> {
        match fs::read_to_string(path) {
            Ok(text) => Ok(Keywords::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Keywords::default()),
            Err(e) => Err(e),
        }
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

    /// Replaces the file atomically (temp file + rename), as Dovecot does.
    pub fn write(&self, path: &Path, mode: u32) -> io::Result<()> {
        let tmp = path.with_extension(format!("maildir-backup.{}", std::process::id()));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(self.to_text().as_bytes())?;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
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
}
