//! maildir-backup core: the file layer every module goes through (`fsx`: directory
//! descriptors, never a followed symlink), Maildir model, dotlock, copy engine, manifest and
//! verify. Nothing in this library knows about Dovecot's process model; the doveadm plugin
//! (`plugin`) and the CLI (`src/main.rs`) are thin layers over it.

pub mod dotlock;
pub mod fsx;
pub mod sysexits;
pub mod maildir;
pub mod engine;
pub mod manifest;
pub mod staging;
pub mod verify;
pub mod template;
#[cfg(feature = "doveadm-plugin")]
pub mod plugin;
pub mod repo;
pub mod restore;
