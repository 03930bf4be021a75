//! The Maildir model: where a user's mail lives (`location`), the same opened for use
//! (`opened`), its folders (`folders`), message file names (`filename`), Dovecot's
//! `dovecot-uidlist` (`uidlist`) and `dovecot-keywords` (`keywords`).

pub mod filename;
pub mod folders;
pub mod keywords;
pub mod location;
pub mod opened;
pub mod uidlist;

pub use filename::{unique_part, MessageName, Subdir};
pub use folders::Folder;
pub use location::{Layout, MailLocation};
pub use opened::Maildir;
pub use uidlist::UIDLIST;

/// Dovecot's per-folder control files that a backup carries (taken under the uidlist lock).
pub const FOLDER_CONTROL_FILES: &[&str] = &[UIDLIST, keywords::KEYWORDS_FILE];
/// The empty file that marks a Maildir++ subfolder.
pub const MAILDIRFOLDER: &str = "maildirfolder";
/// A folder's three directories; only `cur/` and `new/` hold messages.
pub const MESSAGE_DIRS: [&str; 3] = ["cur", "new", "tmp"];
/// Size limit of every control file but `dovecot-uidlist` (keywords, subscriptions, markers:
/// all a few KiB at most; anything bigger was planted).
pub const CONTROL_FILE_LIMIT: u64 = 1 << 20;

/// Per-user files of the Maildir root (or CONTROL= root) that a backup carries.
pub fn is_user_control_file(name: &str) -> bool {
    name == "subscriptions" || name == "dovecot-uidvalidity" || name.starts_with("dovecot-uidvalidity.")
}

/// The size limit for control file `name`.
pub fn control_file_limit(name: &str) -> u64 {
    if name == UIDLIST { uidlist::UIDLIST_LIMIT } else { CONTROL_FILE_LIMIT }
}
