//! The main job on an embedded default: a throwaway Dovecot on 127.0.0.1 (its own base_dir
//! under a temp dir), generated mail, IMAP clients changing flags, moving and delivering
//! mail, and a consistent live backup taken meanwhile; then `verify`, and Dovecot reading
//! the backup. Run by `scripts/demo.sh` (`-- --messages N` to change the size).

// The tests' private-Dovecot harness (only the parts the demo needs).
#[allow(dead_code)]
#[path = "../tests/support/dovecot.rs"]
mod dovecot;
#[allow(dead_code)]
#[path = "../tests/support/dovecot_common.rs"]
mod dovecot_common;
#[allow(dead_code)]
#[path = "../tests/support/imap.rs"]
mod imap;
mod support {
    pub use crate::dovecot::*;
    pub use crate::imap::*;
}

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{chown_vmail_recursive, populate, tempdir, Dovecot, DovecotOptions};

const FOLDERS: [&str; 4] = ["INBOX", "Sent", "Archive", "Lists.Rust"];

fn main() {
    let per_folder: usize = std::env::args()
        .skip_while(|a| a != "--messages")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
        / FOLDERS.len();
    println!("== starting a throwaway Dovecot on 127.0.0.1");
    let d = Dovecot::start(DovecotOptions::default());
    println!("   instance dir {}, IMAP port {}", d.dir().display(), d.port());
    println!("== generating {} messages in {} folders for user alice", per_folder * FOLDERS.len(), FOLDERS.len());
    populate(&d, "alice", &FOLDERS, per_folder);

    // IMAP clients keep changing the mailbox while we back it up.
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, changes, port) = (stop.clone(), changes.clone(), d.port());
        std::thread::spawn(move || {
            let mut imap = support::Imap::connect(port);
            imap.login("alice", support::PASSWORD);
            let _ = imap.select("INBOX");
            let mut uid = 1u32;
            while !stop.load(Ordering::Relaxed) {
                let op = if uid % 2 == 0 { "+FLAGS" } else { "-FLAGS" };
                let _ = imap.uid_store(&uid.to_string(), op, "\\Seen \\Flagged");
                if uid % 7 == 0 {
                    let _ = imap.uid_move(&uid.to_string(), "Archive");
                }
                if uid % 5 == 0 {
                    let _ = imap.append("Sent", "\\Seen", &support::message(1_000_000 + uid as usize, 800));
                }
                let _ = imap.noop(); // makes Dovecot rename the files now
                changes.fetch_add(1, Ordering::Relaxed);
                uid = uid % per_folder as u32 + 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    let out = tempdir();
    let dest = out.path().join("alice");
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/maildir-backup");
    let source = d.mail_location("alice");
    println!("== backing up while IMAP clients change the mailbox:\n   maildir-backup backup {source} {}", dest.display());
    let status = Command::new(&bin).args(["backup", &source]).arg(&dest).status().expect("run maildir-backup");
    stop.store(true, Ordering::Relaxed);
    let _ = churn.join();
    assert!(status.success(), "backup failed");
    println!("   ({} IMAP changes were made while the backup ran)", changes.load(Ordering::Relaxed));

    println!("== maildir-backup verify {}", dest.display());
    let status = Command::new(&bin).arg("verify").arg(&dest).status().expect("run verify");
    assert!(status.success(), "verify failed");

    println!("== Dovecot reads the backup (doveadm fetch against maildir:{})", dest.display());
    chown_vmail_recursive(out.path());
    let location = format!("maildir:{}:INDEX=MEMORY", dest.display());
    for f in FOLDERS {
        let rows = d.fetch_uid_flags("alice", f, Some(&location));
        println!("   {f:12} {:6} messages, UIDs {}..{}", rows.len(), rows.first().map_or(0, |r| r.0), rows.last().map_or(0, |r| r.0));
    }
    println!("== done; everything was in {} and is removed now", d.dir().display());
}
