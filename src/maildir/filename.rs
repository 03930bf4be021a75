//! Maildir message file names: `<unique>[:2,<flags>]`.
//!
//! The unique part (before `:`) identifies a message for its whole life; Dovecot renames the
//! file to change flags and moves it `new/` -> `cur/`, but never changes the unique part.

use std::fmt;

/// `cur/` or `new/`: the two directories that hold messages (`tmp/` never does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subdir {
    Cur,
    New,
}

impl Subdir {
    pub const ALL: [Subdir; 2] = [Subdir::Cur, Subdir::New];
    /// Position in `ALL` (for arrays indexed by subdir).
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Subdir::Cur => "cur",
            Subdir::New => "new",
        }
    }
}

impl fmt::Display for Subdir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed message file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageName<'a> {
    pub full: &'a str,
}

impl<'a> MessageName<'a> {
    /// A message file name, or None for names a Maildir reader skips (dot files).
    pub fn parse(full: &'a str) -> Option<MessageName<'a>> {
        if full.is_empty() || full.starts_with('.') {
            return None;
        }
        Some(MessageName { full })
    }

    /// A name a backup can carry: one path component without control characters (a newline
    /// or an escape sequence in a file name only serves to confuse whoever reads a report).
    pub fn is_safe(&self) -> bool {
        crate::fsx::check_name(std::ffi::OsStr::new(self.full)).is_ok() && !crate::fsx::has_control(self.full)
    }

    /// The part before `:`: stable across flag changes and `new/`->`cur/` moves.
    pub fn unique(&self) -> &'a str {
        self.full.split_once(':').map(|(u, _)| u).unwrap_or(self.full)
    }

    /// Flag letters after `:2,` (system flags in upper case, keyword letters a-z).
    pub fn flags(&self) -> &'a str {
        match self.full.split_once(':') {
            Some((_, info)) => info.strip_prefix("2,").unwrap_or(""),
            None => "",
        }
    }

    /// The size Dovecot recorded in the name (`,S=<bytes>`), if any.
    pub fn size(&self) -> Option<u64> {
        self.unique().split(',').find_map(|part| part.strip_prefix("S=")).and_then(|s| s.parse().ok())
    }
}

/// The unique part of file name `name` (the whole name if it is not a message's): what
/// identifies a message across its renames.
pub fn unique_part(name: &str) -> &str {
    MessageName::parse(name).map_or(name, |m| m.unique())
}

/// `<unique>:2,<flags>` with the flags given (as Dovecot writes them).
pub fn with_flags(unique: &str, flags: &str) -> String {
    format!("{unique}:2,{flags}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dovecot_names() {
        let n = MessageName::parse("1795546104.M662978P7084.host,S=135,W=142:2,Fab").unwrap();
        assert_eq!(n.unique(), "1795546104.M662978P7084.host,S=135,W=142");
        assert_eq!(n.flags(), "Fab");
        assert_eq!(n.size(), Some(135));
        let new = MessageName::parse("1795546104.M1P2.host").unwrap();
        assert_eq!(new.unique(), new.full);
        assert_eq!(new.flags(), "");
        assert_eq!(new.size(), None);
        assert!(MessageName::parse(".hidden").is_none());
        assert!(n.is_safe() && !MessageName::parse("a\nb").unwrap().is_safe() && !MessageName::parse("a/b").unwrap().is_safe());
        assert_eq!(with_flags("u", "RS"), "u:2,RS");
    }
}

#[cfg(test)]
mod name_tests;
