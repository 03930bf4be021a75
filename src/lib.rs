//! maildir-backup core: Maildir model, dotlock, copy engine, manifest and verify.
//! Nothing in this library knows about Dovecot's process model; the doveadm plugin
//! (`plugin`) and the CLI (`src/main.rs`) are thin layers over it.

pub mod dotlock;
pub mod sysexits;
