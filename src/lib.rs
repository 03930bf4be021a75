//! maildir-backup core: the file layer every module goes through (`fsx`: directory
//! descriptors, never a followed symlink), the Maildir model, dot-locks, the backup engine,
//! manifests, verify, snapshot repositories and restore; and above them `job`, the one layer
//! both front ends call. Nothing here but `plugin` knows Dovecot's process model; the doveadm
//! plugin (`plugin` + `c-shim/`) and the CLI (`src/main.rs`, `src/cli/`) only translate
//! their arguments into jobs and the results into output.

pub mod check;
pub mod dotlock;
pub mod engine;
pub mod fsx;
pub mod job;
pub mod maildir;
pub mod manifest;
pub mod metrics;
#[cfg(feature = "doveadm-plugin")]
mod plugin;
pub mod repo;
pub mod restore;
pub mod store;
pub(crate) mod staging;
pub mod sysexits;
pub(crate) mod template;
pub mod verify;
pub mod warnings;
#[cfg(test)]
mod test_support;
