//! How long a backup holds the uidlist locks of a live mailbox — what every IMAP session of the
//! user waits for — against the obvious way to a consistent copy, holding them for the whole copy.
//!
//! `cargo bench --bench lock_hold` (as root: it starts a private Dovecot 2.3 on 127.0.0.1 with
//! the tests' harness). Options: `-- --messages 100000 --runs 20 [--plugin]`; `--plugin` also
//! runs as many `doveadm maildir-backup` backups with the plugin built for release (they run as
//! the mail user, whose priority cannot be raised under the locks).
//!
//! The mailbox is loaded over IMAP (5 folders), then changed for the whole run as in the live
//! tests: four IMAP clients set flags, move, append and expunge, dovecot-lda delivers, and a
//! folder worker creates, fills, renames and deletes folders. Meanwhile `maildir-backup backup`
//! (release build) runs `--runs` times; each reports its lock hold. The peer, measured in the same
//! run under the same churn, is `rsync -a` of the same Maildir: how long the locks would be held
//! by taking them all and copying (what `maildirlock` + `rsync` does).

#[allow(dead_code, unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::churn::{Churn, ChurnOptions, Tracker};
use support::plugin::{build, Profile};
use support::{chown_vmail_recursive, populate, tempdir, Dovecot, DovecotOptions};

const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive", "Lists", "Trash"];

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Sorted holds: "p50 .., p99 .., max .." (nearest rank).
fn summary(holds: &mut [f64]) -> (f64, f64, f64) {
    holds.sort_by(|a, b| a.total_cmp(b));
    (quantile(holds, 0.5), quantile(holds, 0.99), holds[holds.len() - 1])
}

fn main() {
    let messages: usize = arg("--messages").and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(20);
    let plugin = std::env::args().any(|a| a == "--plugin");
    if plugin {
        // Read once by the harness, before any thread starts.
        std::env::set_var("MB_PLUGIN_SO", build("plugin-bench", None, Profile::Release).join("libmaildir_backup.so"));
    }
    let bin = env!("CARGO_BIN_EXE_maildir-backup");
    let t = Instant::now();
    let d = Dovecot::start(DovecotOptions { extra_conf: "mail_max_userip_connections = 50\n".into(), ..Default::default() });
    populate(&d, "alice", FOLDERS, messages / FOLDERS.len());
    let maildir = d.maildir("alice");
    chown_vmail_recursive(&maildir);
    println!("lock hold under churn: {messages} messages in {} folders (loaded in {:.0} s), {runs} backups", FOLDERS.len(), t.elapsed().as_secs_f64());

    let tracker = Tracker::new();
    tracker.register_existing(&maildir);
    let churn = Churn::start(
        ChurnOptions {
            port: d.port(),
            conf: d.conf(),
            user: "alice".into(),
            folders: FOLDERS.iter().map(|f| f.to_string()).collect(),
            imap_workers: 4,
            lda: true,
            pace: Duration::from_millis(2),
            lda_pace: Duration::from_millis(30),
            folder_worker: true,
        },
        tracker,
    );
    churn.wait_ops(50, Duration::from_secs(30));

    let out = tempdir();
    let mut holds = Vec::new();
    let mut phases = Vec::new();
    let mut seconds = Vec::new();
    for r in 0..runs {
        let dest = out.path().join(format!("b{r}"));
        let t = Instant::now();
        let o = Command::new(bin).args(["backup", "--json"]).arg(&maildir).arg(&dest).output().expect("run maildir-backup");
        assert!(o.status.success(), "backup {r} failed: {}", String::from_utf8_lossy(&o.stderr));
        seconds.push(t.elapsed().as_secs_f64());
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
        let hold = j["lock_hold_ms"].as_f64().expect("lock_hold_ms");
        holds.push(hold);
        phases.push((hold, j["lock_hold_phases"].to_string()));
        println!("  backup {r}: {:.1} s, lock hold {hold:.1} ms after {} attempts: {}", seconds[r], j["lock_attempts"], j["lock_hold_phases"]);
        let _ = std::fs::remove_dir_all(&dest);
    }
    let mut plugin_holds = Vec::new();
    if plugin {
        let out = support::readback::vmail_tempdir();
        for r in 0..runs {
            let dest = out.path().join(format!("p{r}"));
            let run = support::plugin::run_plugin(&d, &["-f", "json", "maildir-backup", "-u", "alice", &dest.to_string_lossy()]);
            run.expect_ok();
            let hold: f64 = run.json_rows()[0]["lock_ms"].parse().expect("lock_ms");
            println!("  plugin backup {r}: {:.1} s, lock hold {hold:.1} ms", run.elapsed.as_secs_f64());
            plugin_holds.push(hold);
            let _ = std::fs::remove_dir_all(&dest);
        }
    }
    let mut copies = Vec::new();
    for r in 0..3 {
        let dest = out.path().join(format!("rsync{r}"));
        let t = Instant::now();
        let o = Command::new("rsync").arg("-a").arg(format!("{}/", maildir.display())).arg(&dest).output().expect("run rsync");
        // 24: files vanished meanwhile (the churn), as expected of a copy without the locks.
        assert!(matches!(o.status.code(), Some(0) | Some(24)), "rsync: {}", String::from_utf8_lossy(&o.stderr));
        copies.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = std::fs::remove_dir_all(&dest);
    }
    let stats = churn.stop();

    phases.sort_by(|a, b| a.0.total_cmp(&b.0));
    copies.sort_by(|a, b| a.total_cmp(b));
    seconds.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = summary(&mut holds);
    let peer = quantile(&copies, 0.5);
    println!(
        "  churn meanwhile: {} flag changes, {} moves, {} appends, {} expunges, {} deliveries, {} folder operations ({} refused)",
        stats.flag_changes, stats.moves, stats.appends, stats.expunges, stats.deliveries, stats.folder_ops, stats.errors.len()
    );
    println!("  maildir-backup: lock hold p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (backup itself: median {:.1} s)", quantile(&seconds, 0.5));
    for (what, (hold, split)) in [("median", &phases[(phases.len() - 1) / 2]), ("longest", &phases[phases.len() - 1])] {
        println!("  {what} hold {hold:.1} ms: {split}");
    }
    if plugin {
        let (p50, p99, max) = summary(&mut plugin_holds);
        println!("  doveadm maildir-backup (plugin): lock hold p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    }
    println!("  peer, locks held for a whole rsync -a: median {peer:.0} ms");
    println!("  ratio ours/peer: p50 {:.4}, p99 {:.4}, max {:.4}", p50 / peer, p99 / peer, max / peer);
    println!("  targets (p99 <= 50 ms, max <= 200 ms): {}", if p99 <= 50.0 && max <= 200.0 { "met" } else { "NOT met" });
}
