//! The Maildir model: where a user's mail lives (`location`), its folders (`folders`),
//! message file names (`filename`) and Dovecot's `dovecot-uidlist` (`uidlist`).

pub mod filename;
pub mod folders;
pub mod keywords;
pub mod location;
pub mod uidlist;

pub use filename::{MessageName, Subdir};
pub use folders::Folder;
pub use location::{Layout, MailLocation};

/// Dovecot's per-folder control files that a backup carries (taken under the uidlist lock).
pub const FOLDER_CONTROL_FILES: &[&str] = &["dovecot-uidlist", "dovecot-keywords"];
/// The file the uidlist lock protects.
pub const UIDLIST: &str = "dovecot-uidlist";
