//! Where a user's Maildir lives: a plain path, a Dovecot 2.3 `mail_location` string
//! (`maildir:PATH[:CONTROL=DIR][:INDEX=DIR][:LAYOUT=fs]`) or Dovecot 2.4's separate settings.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocationError {
    #[error("mail location {0:?}: only the maildir driver is supported (got {1:?})")]
    Driver(String, String),
    #[error("mail location {0:?}: {1} is not supported by maildir-backup")]
    Unsupported(String, String),
    #[error("mail location {0:?}: unknown LAYOUT {1:?} (expected maildir++ or fs)")]
    Layout(String, String),
    #[error("mail location {0:?}: the path is empty")]
    Empty(String),
    #[error("mail location {0:?}: {1:?} still holds a variable or '~'; give the expanded path of one user")]
    Unexpanded(String, String),
}

/// How folder names map to directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// `.Folder.Sub` directories in the root (Dovecot's default for maildir).
    #[serde(rename = "maildir++")]
    MaildirPlusPlus,
    /// `Folder/Sub` directories (`LAYOUT=fs`).
    #[serde(rename = "fs")]
    Fs,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Layout> {
        match s.to_ascii_lowercase().as_str() {
            "maildir++" => Some(Layout::MaildirPlusPlus),
            "fs" => Some(Layout::Fs),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::MaildirPlusPlus => "maildir++",
            Layout::Fs => "fs",
        }
    }
    /// The control/index dir name Dovecot gives INBOX under CONTROL=/INDEX=.
    pub fn inbox_dir_name(self) -> &'static str {
        match self {
            Layout::MaildirPlusPlus => ".INBOX",
            Layout::Fs => "INBOX",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailLocation {
    /// The Maildir root (INBOX lives here).
    pub root: PathBuf,
    /// `CONTROL=`: where dovecot-uidlist, dovecot-keywords and their lock live.
    pub control: Option<PathBuf>,
    /// `INDEX=`: where Dovecot's index files live.
    pub index: Option<PathBuf>,
    pub layout: Layout,
}

/// `mail_location` keys that only tune behaviour and do not move any file we copy.
const HARMLESS_KEYS: &[&str] = &["UTF8", "NO-NOSELECT", "NOSELECT", "LITERAL", "VOLATILEDIR", "INDEXPVT", "ITERINDEX", "BROKENCHARS"];

impl MailLocation {
    pub fn plain(root: impl Into<PathBuf>) -> MailLocation {
        MailLocation { root: root.into(), control: None, index: None, layout: Layout::MaildirPlusPlus }
    }

    /// Parses a Maildir path or a Dovecot 2.3 `mail_location` string.
    pub fn parse(spec: &str) -> Result<MailLocation, LocationError> {
        let Some(rest) = spec.strip_prefix("maildir:") else {
            if let Some((driver, _)) = spec.split_once(':') {
                if !driver.is_empty() && !driver.contains('/') {
                    return Err(LocationError::Driver(spec.to_string(), driver.to_string()));
                }
            }
            let loc = MailLocation::plain(spec);
            loc.check_expanded(spec)?;
            return Ok(loc);
        };
        let parts = split_unescaped(rest);
        let mut it = parts.into_iter();
        let root = it.next().unwrap_or_default();
        if root.is_empty() {
            return Err(LocationError::Empty(spec.to_string()));
        }
        let mut loc = MailLocation::plain(root);
        for part in it {
            let (key, value) = part.split_once('=').unwrap_or((part.as_str(), ""));
            match key.to_ascii_uppercase().as_str() {
                "CONTROL" => loc.control = Some(PathBuf::from(value)),
                "INDEX" if value.eq_ignore_ascii_case("MEMORY") => loc.index = None,
                "INDEX" => loc.index = Some(PathBuf::from(value)),
                "LAYOUT" => {
                    loc.layout = Layout::parse(value).ok_or_else(|| LocationError::Layout(spec.to_string(), value.to_string()))?
                }
                k if HARMLESS_KEYS.contains(&k) => {}
                k => return Err(LocationError::Unsupported(spec.to_string(), format!("{k}="))),
            }
        }
        loc.check_expanded(spec)?;
        Ok(loc)
    }

    fn check_expanded(&self, spec: &str) -> Result<(), LocationError> {
        for p in [Some(&self.root), self.control.as_ref(), self.index.as_ref()].into_iter().flatten() {
            let s = p.to_string_lossy();
            if s.contains('%') || s.starts_with('~') {
                return Err(LocationError::Unexpanded(spec.to_string(), s.into_owned()));
            }
        }
        Ok(())
    }

    /// The dir holding `dovecot-uidlist` for a folder (its own dir unless CONTROL= is set).
    pub fn control_dir(&self, rel: &Path) -> PathBuf {
        self.split_dir(self.control.as_deref(), rel)
    }

    /// The dir holding a folder's index files.
    pub fn index_dir(&self, rel: &Path) -> PathBuf {
        self.split_dir(self.index.as_deref(), rel)
    }

    /// A folder's control dir relative to the control root (`control_root`).
    pub fn control_rel(&self, rel: &Path) -> PathBuf {
        self.split_rel(self.control.is_some(), rel)
    }

    /// A folder's index dir relative to the index root (`index_root`).
    pub fn index_rel(&self, rel: &Path) -> PathBuf {
        self.split_rel(self.index.is_some(), rel)
    }

    fn split_rel(&self, split_out: bool, rel: &Path) -> PathBuf {
        if split_out && rel.as_os_str().is_empty() { PathBuf::from(self.layout.inbox_dir_name()) } else { rel.to_path_buf() }
    }

    /// The dir holding per-user files (subscriptions, dovecot-uidvalidity).
    pub fn control_root(&self) -> &Path {
        self.control.as_deref().unwrap_or(&self.root)
    }

    fn split_dir(&self, base: Option<&Path>, rel: &Path) -> PathBuf {
        match base {
            None => self.root.join(rel),
            Some(base) if rel.as_os_str().is_empty() => base.join(self.layout.inbox_dir_name()),
            Some(base) => base.join(rel),
        }
    }

    /// The 2.3 `mail_location` string for this location (for messages and docs).
    pub fn to_mail_location(&self) -> String {
        let esc = |p: &Path| p.to_string_lossy().replace(':', "::");
        let mut s = format!("maildir:{}", esc(&self.root));
        if let Some(c) = &self.control {
            s.push_str(&format!(":CONTROL={}", esc(c)));
        }
        if let Some(i) = &self.index {
            s.push_str(&format!(":INDEX={}", esc(i)));
        }
        if self.layout == Layout::Fs {
            s.push_str(":LAYOUT=fs");
        }
        s
    }
}

/// Splits on ':' where "::" stands for a literal ':' (Dovecot's escaping).
fn split_unescaped(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ':' {
            if chars.peek() == Some(&':') {
                chars.next();
                parts.last_mut().expect("never empty").push(':');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        let l = MailLocation::parse("maildir:/m/a/Maildir:CONTROL=/c/a:INDEX=/i/a:LAYOUT=fs").unwrap();
        assert_eq!(l.root, PathBuf::from("/m/a/Maildir"));
        assert_eq!(l.control_dir(Path::new("")), PathBuf::from("/c/a/INBOX"));
        assert_eq!(l.control_dir(Path::new("A/B")), PathBuf::from("/c/a/A/B"));
        assert_eq!(l.index_dir(Path::new("")), PathBuf::from("/i/a/INBOX"));
        assert_eq!(l.layout, Layout::Fs);
        assert_eq!((l.control_rel(Path::new("")), l.index_rel(Path::new("A"))), (PathBuf::from("INBOX"), PathBuf::from("A")));
        assert_eq!(MailLocation::plain("/m").control_rel(Path::new("")), PathBuf::new());
        let p = MailLocation::parse("maildir:/m/x::y:CONTROL=/c").unwrap();
        assert_eq!(p.root, PathBuf::from("/m/x:y"));
        assert_eq!(p.control_dir(Path::new("")), PathBuf::from("/c/.INBOX"));
        assert_eq!(p.control_dir(Path::new(".Sent")), PathBuf::from("/c/.Sent"));
        assert_eq!(MailLocation::parse("/plain/path").unwrap(), MailLocation::plain("/plain/path"));
        assert!(MailLocation::parse("mdbox:/x").is_err());
        assert!(MailLocation::parse("maildir:/m/%u").is_err());
        assert!(MailLocation::parse("maildir:/m:ALT=/alt").is_err());
        assert!(MailLocation::parse("maildir:/m:LAYOUT=weird").is_err());
        assert_eq!(MailLocation::parse(&l.to_mail_location()).unwrap(), l);
    }
}
