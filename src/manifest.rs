//! The manifest inside every backup: one JSON record per line — a header, one record per
//! folder (with its uidlist header) and one per message (folder, unique name, flags, size,
//! BLAKE3 checksum). `verify` checks a backup against it; snapshots use it to find messages
//! they can hard-link instead of copying.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::maildir::{Layout, Subdir};

pub const MANIFEST_NAME: &str = "maildir-backup.manifest";
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    pub tool: String,
    /// The source as a Dovecot 2.3 mail_location string.
    pub source: String,
    pub layout: Layout,
    /// Unix time of the reconcile instant: the backup equals the mail at that moment.
    pub taken_at: i64,
    pub lock_hold_ms: u64,
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Bytes read from the source; the rest were hard-linked from the previous snapshot.
    #[serde(default)]
    pub bytes_copied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FolderRecord {
    /// Directory relative to the backup root ("" for INBOX).
    pub path: String,
    pub name: String,
    /// First line of the folder's dovecot-uidlist at the reconcile instant.
    pub uidlist_header: Option<String>,
    /// Unique names the uidlist still lists but that had no file at the reconcile instant:
    /// messages Dovecot expunged and has not yet dropped from its uidlist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uidlist_expunged: Vec<String>,
    pub messages: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRecord {
    pub folder: String,
    pub dir: Subdir,
    pub name: String,
    pub unique: String,
    pub flags: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Record {
    Backup(Header),
    Folder(FolderRecord),
    Message(MessageRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: Header,
    pub folders: Vec<FolderRecord>,
    pub messages: Vec<MessageRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, #[source] source: io::Error },
    #[error("{path}: line {line}: {what}")]
    Bad { path: String, line: usize, what: String },
}

impl Manifest {
    pub fn write(&self, path: &Path) -> Result<(), ManifestError> {
        let io_err = |op, e| ManifestError::Io { op, path: path.display().to_string(), source: e };
        // 0600 like the mail it describes, whatever the caller's umask (doveadm's is 0077).
        let file = std::os::unix::fs::OpenOptionsExt::mode(std::fs::OpenOptions::new().write(true).create(true).truncate(true), 0o600)
            .open(path)
            .map_err(|e| io_err("create", e))?;
        let mut w = BufWriter::new(file);
        let mut put = |r: &Record| -> io::Result<()> {
            serde_json::to_writer(&mut w, r).map_err(io::Error::other)?;
            w.write_all(b"\n")
        };
        put(&Record::Backup(self.header.clone())).map_err(|e| io_err("write", e))?;
        for f in &self.folders {
            put(&Record::Folder(f.clone())).map_err(|e| io_err("write", e))?;
        }
        for m in &self.messages {
            put(&Record::Message(m.clone())).map_err(|e| io_err("write", e))?;
        }
        let file = w.into_inner().map_err(|e| io_err("write", e.into_error()))?;
        file.sync_all().map_err(|e| io_err("fsync", e))
    }

    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|e| ManifestError::Io { op: "open", path: p.clone(), source: e })?;
        let mut header = None;
        let (mut folders, mut messages) = (Vec::new(), Vec::new());
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| ManifestError::Io { op: "read", path: p.clone(), source: e })?;
            if line.is_empty() {
                continue;
            }
            let rec: Record = serde_json::from_str(&line)
                .map_err(|e| ManifestError::Bad { path: p.clone(), line: i + 1, what: e.to_string() })?;
            match rec {
                Record::Backup(h) if header.is_none() && i == 0 => header = Some(h),
                Record::Backup(_) => return Err(ManifestError::Bad { path: p, line: i + 1, what: "unexpected header".into() }),
                Record::Folder(f) => folders.push(f),
                Record::Message(m) => messages.push(m),
            }
        }
        let header = header.ok_or_else(|| ManifestError::Bad { path: p.clone(), line: 1, what: "no backup header".into() })?;
        if header.format != FORMAT {
            return Err(ManifestError::Bad { path: p, line: 1, what: format!("manifest format {} is not {FORMAT}", header.format) });
        }
        Ok(Manifest { header, folders, messages })
    }
}
