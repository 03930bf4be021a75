//! A repository snapshot takes what it can from the previous snapshot (hard links, unchanged
//! control files); whatever it takes over, it must equal a full backup of the same instant: the same
//! files with the same bytes, modes and times, the same manifest records, and it verifies. Checked
//! after each kind of change made in one folder alone (flags, a move, expunges, new mail, a folder
//! renamed, a folder deleted), and under IMAP churn. And a snapshot in the first form (its folders'
//! own directories, every record in one uncompressed manifest) is still read: by `verify`, by
//! `restore` and as the previous snapshot.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::churn::{self, imap_churn, Churn, Tracker};
use support::repo_helpers::*;
use support::*;

const USER: &str = "alice";
const FOLDERS: &[&str] = &["INBOX", "Sent", "Archive", "Archive.2024"];
const MANIFEST: &str = "maildir-backup.manifest";

/// Everything below `root` but the manifest, by relative path: directories with their mode, files
/// with size, mode, modification time and BLAKE3.
fn contents(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let p = e.path();
            // A folder's cur/ and new/ in a snapshot are links into the series' store.
            let md = if churn::is_store_link(&p) { fs::metadata(&p) } else { e.metadata() }.unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == MANIFEST {
                continue;
            }
            if md.is_dir() {
                out.insert(rel, format!("dir {:o}", md.mode()));
                walk(root, &p, out);
            } else {
                out.insert(rel, format!("file {} {:o} {}.{} {}", md.len(), md.mode(), md.mtime(), md.mtime_nsec(), blake3_of(&p)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A Dovecot with USER's mailbox: `per_folder` messages in each of `folders`; a temporary
/// directory for the repository (`repo` in it) and the full backups; the source to back up.
fn mailbox(folders: &[&str], per_folder: usize) -> (Dovecot, tempfile::TempDir, PathBuf, String) {
    let d = start_with_users(&[USER]);
    populate(&d, USER, folders, per_folder);
    let out = tempdir();
    let repo = out.path().join("repo");
    let source = d.maildir(USER).display().to_string();
    (d, out, repo, source)
}

/// The snapshot equals the full backup and both verify.
fn assert_equals_full_backup(snapshot: &Path, full: &Path, what: &str) {
    assert_verifies(snapshot);
    assert_verifies(full);
    let (s, f) = (contents(snapshot), contents(full));
    for (path, want) in &f {
        assert_eq!(s.get(path), Some(want), "{what}: {path} differs from a full backup ({})", snapshot.display());
    }
    assert_eq!(s.len(), f.len(), "{what}: the snapshot holds files a full backup does not: {:?}", s.keys().filter(|k| !f.contains_key(*k)).collect::<Vec<_>>());
    let (sm, fm) = (read_manifest(snapshot), read_manifest(full));
    let sorted = |mut v: Vec<ManifestMsg>| {
        v.sort_by(|a, b| (&a.folder, &a.dir, &a.name).cmp(&(&b.folder, &b.dir, &b.name)));
        v
    };
    // What only a snapshot's folder records hold: where in the store, and what the next takes over.
    let plain = |v: &[serde_json::Value]| {
        v.iter()
            .map(|f| {
                let mut f = f.clone();
                for key in ["store", "bytes", "source_dirs"] {
                    f.as_object_mut().unwrap().remove(key);
                }
                f
            })
            .collect::<Vec<_>>()
    };
    assert!(sm.folders.iter().all(|f| f["store"].is_string()), "{what}: a snapshot folder is not in the store: {:?}", sm.folders);
    assert_eq!(plain(&sm.folders), fm.folders, "{what}: folder records");
    assert_eq!(sorted(sm.messages), sorted(fm.messages), "{what}: message records");
    for key in ["folders", "messages", "bytes", "layout", "source"] {
        assert_eq!(sm.header[key], fm.header[key], "{what}: header {key}");
    }
}

/// A full backup of `source` into `dest`.
fn full_backup(source: &str, dest: &Path) {
    cli_ok(&["backup", source, dest.to_str().unwrap()]);
}

fn uid_set(imap: &mut Imap, mailbox: &str, n: usize) -> String {
    imap.select(mailbox).unwrap();
    imap.uid_search_all().unwrap().iter().take(n).map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn a_snapshot_after_any_change_in_one_folder_equals_a_full_backup() {
    let (d, out, repo, source) = mailbox(FOLDERS, 12);
    take_snapshot(&source, &repo, USER, &[]);
    // Listed a second after the last change: the next snapshot may take its folders over.
    std::thread::sleep(Duration::from_millis(1100));
    let (mut previous, _) = take_snapshot(&source, &repo, USER, &[]);
    type Change = fn(&mut Imap);
    let changes: [(&str, Change); 6] = [
        ("flags changed in Sent", |imap| {
            let set = uid_set(imap, "Sent", 5);
            imap.uid_store(&set, "+FLAGS", "\\Seen \\Flagged $Work").unwrap();
            imap.noop().unwrap();
        }),
        ("messages moved from Archive to INBOX", |imap| {
            let set = uid_set(imap, "Archive", 3);
            imap.uid_move(&set, "INBOX").unwrap();
        }),
        ("messages expunged from INBOX", |imap| {
            let set = uid_set(imap, "INBOX", 4);
            imap.uid_store(&set, "+FLAGS", "\\Deleted").unwrap();
            imap.uid_expunge(&set).unwrap();
        }),
        ("new mail in Archive.2024", |imap| {
            for i in 0..3 {
                imap.append("Archive.2024", "", &message(900 + i, 700)).unwrap();
            }
        }),
        ("Archive.2024 renamed", |imap| {
            imap.command("RENAME Archive.2024 Archive.2025").unwrap();
        }),
        ("Archive.2025 deleted", |imap| {
            imap.command("DELETE Archive.2025").unwrap();
        }),
    ];
    for (i, (what, change)) in changes.into_iter().enumerate() {
        let mut imap = d.imap(USER);
        change(&mut imap);
        imap.logout();
        // One snapshot per second: the next gets a name of its own.
        std::thread::sleep(Duration::from_millis(1100));
        let (snapshot, report) = take_snapshot(&source, &repo, USER, &[]);
        // Folders untouched since before the previous snapshot are taken over whole.
        assert!(report["folders_taken_over"].as_u64().unwrap_or(0) > 0, "{what}: nothing was taken from the previous snapshot: {report}");
        let full = out.path().join(format!("full-{i}"));
        full_backup(&source, &full);
        assert_equals_full_backup(&snapshot, &full, what);
        // A folder that changed little has only its changes written (a rename or a deletion
        // changes none: the renamed folder is new).
        let written_as_changes = new_entries(&previous, &snapshot).iter().filter(|id| stored_base(&repo.join(USER).join(".store"), id).is_some()).count();
        assert_eq!(written_as_changes > 0, i < 4, "{what}: {written_as_changes} folders written as changes");
        previous = snapshot;
    }
}

/// The store entries `snapshot` names that `previous` does not.
fn new_entries(previous: &Path, snapshot: &Path) -> Vec<String> {
    let ids = |s: &Path| read_manifest(s).folders.iter().filter_map(|f| f["store"].as_str().map(str::to_string)).collect::<Vec<_>>();
    let old = ids(previous);
    ids(snapshot).into_iter().filter(|id| !old.contains(id)).collect()
}

#[test]
fn snapshots_under_churn_equal_full_backups_of_the_same_instant() {
    let (d, out, repo, source) = mailbox(FOLDERS, 25);
    let churn = Churn::start(imap_churn(&d, FOLDERS, 3), Tracker::new());
    churn.wait_ops(30, Duration::from_secs(30));
    take_snapshot(&source, &repo, USER, &[]);
    for i in 0..3 {
        churn.wait_ops(40, Duration::from_secs(30));
        // The same instant: nothing changes between the snapshot and the full backup.
        churn.pause();
        let (snapshot, _) = take_snapshot(&source, &repo, USER, &[]);
        let full = out.path().join(format!("full-{i}"));
        full_backup(&source, &full);
        churn.resume();
        assert_equals_full_backup(&snapshot, &full, &format!("under churn, snapshot {i}"));
        std::thread::sleep(Duration::from_millis(1100));
    }
    let stats = churn.stop();
    assert!(stats.moves > 0 && stats.flag_changes > 0 && stats.appends > 0 && stats.expunges > 0, "churn did too little: {stats:?}");
}

/// Rewrites a snapshot in the first form: each folder's own cur/ and new/ (hard links to the
/// files of its store entry), and one uncompressed manifest of format 1 holding every record.
fn to_first_form(snapshot: &Path) {
    let mut lines: Vec<String> = Vec::new();
    let mut parts = Vec::new();
    for line in manifest_text(snapshot).lines().filter(|l| !l.is_empty()) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["kind"].as_str() {
            Some("backup") => v["format"] = 1.into(),
            Some("folder") => {
                let id = v["store"].as_str().expect("a snapshot's folder is stored").to_string();
                let dir = snapshot.join(v["path"].as_str().unwrap());
                for sub in ["cur", "new"] {
                    let (link, entry) = (dir.join(sub), snapshot.join("..").join(".store").join(&id).join(sub));
                    fs::remove_file(&link).unwrap();
                    fs::create_dir(&link).unwrap();
                    for e in fs::read_dir(&entry).unwrap().map(Result::unwrap) {
                        fs::hard_link(e.path(), link.join(e.file_name())).unwrap();
                    }
                }
                parts.push(id);
                for key in ["store", "bytes", "source_dirs"] {
                    v.as_object_mut().unwrap().remove(key);
                }
            }
            _ => {}
        }
        lines.push(v.to_string());
    }
    for id in parts {
        for m in stored_records(&snapshot.join("..").join(".store"), &id) {
            let record = serde_json::json!({"kind": "message", "folder": m.folder, "dir": m.dir, "name": m.name, "unique": m.unique, "flags": m.flags, "size": m.size, "blake3": m.blake3});
            lines.push(record.to_string());
        }
    }
    let path = snapshot.join(MANIFEST);
    let mode = fs::metadata(&path).unwrap().mode();
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    assert!(!fs::read(&path).unwrap().starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
}

#[test]
fn a_first_form_snapshot_is_read_by_verify_restore_and_the_next_snapshot() {
    let (d, out, repo, source) = mailbox(&["INBOX", "Sent"], 10);
    let (old, _) = take_snapshot(&source, &repo, USER, &[]);
    to_first_form(&old);
    assert_verifies(&old);
    // Nothing of the store is needed to read it.
    fs::rename(repo.join(USER).join(".store"), out.path().join("store-aside")).unwrap();
    assert_verifies(&old);
    assert!(!churn::all_files(&old).iter().any(|f| fs::symlink_metadata(f).unwrap().file_type().is_symlink()));

    // The next snapshot links every message from it.
    std::thread::sleep(Duration::from_millis(1100));
    let (new, report) = take_snapshot(&source, &repo, USER, &[]);
    assert_eq!(report["messages_linked"].as_u64(), Some(20), "{report}");
    let inodes = |s: &Path| read_manifest(s).messages.iter().map(|m| (m.unique.clone(), fs::metadata(m.path_in(s)).unwrap().ino())).collect::<BTreeMap<_, _>>();
    assert_eq!(inodes(&new), inodes(&old));

    // And a restore from it into a new Maildir gives the messages back.
    let target: PathBuf = out.path().join("restored");
    cli_ok(&["restore", old.to_str().unwrap(), target.to_str().unwrap()]);
    let restored = |root: &Path| message_files(root).iter().map(|p| blake3_of(p)).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(restored(&target), restored(&d.maildir(USER)));
}

#[test]
fn a_taken_over_folder_whose_uidlist_changed_is_described_anew() {
    let (d, out, repo, source) = mailbox(&["INBOX", "Sent"], 5);
    take_snapshot(&source, &repo, USER, &[]);
    std::thread::sleep(Duration::from_millis(1100));
    take_snapshot(&source, &repo, USER, &[]);
    // Sent's uidlist names one more message with no file (as Dovecot's does for an expunged one
    // until it rewrites the list); its directories stay as they were.
    let uidlist = d.maildir(USER).join(".Sent").join("dovecot-uidlist");
    let mut text = fs::read_to_string(&uidlist).unwrap();
    let last: u32 = text.lines().last().and_then(|l| l.split(' ').next()).and_then(|u| u.parse().ok()).expect("a uidlist line");
    text.push_str(&format!("{} :1700000009.M9P9.gone:2,S\n", last + 1));
    fs::write(&uidlist, text).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (snapshot, report) = take_snapshot(&source, &repo, USER, &[]);
    assert_eq!(report["folders_taken_over"].as_u64(), Some(2), "{report}");
    let full = out.path().join("full");
    full_backup(&source, &full);
    assert_equals_full_backup(&snapshot, &full, "a taken-over folder whose uidlist changed");
    let sent = read_manifest(&snapshot).folders.into_iter().find(|f| f["name"] == "Sent").unwrap();
    assert_eq!(sent["uidlist_expunged"], serde_json::json!(["1700000009.M9P9.gone"]), "{sent}");
}

#[test]
fn verify_counts_each_store_entry_against_its_folder_record() {
    let (_d, _out, repo, source) = mailbox(&["INBOX"], 5);
    let (snapshot, _) = take_snapshot(&source, &repo, USER, &[]);
    assert_verifies(&snapshot);
    // The entry loses a record the folder record still counts.
    let id = read_manifest(&snapshot).folders[0]["store"].as_str().unwrap().to_string();
    let part = repo.join(USER).join(".store").join(id).join("messages");
    let text = String::from_utf8(zstd::decode_all(&fs::read(&part).unwrap()[..]).unwrap()).unwrap();
    let fewer: Vec<&str> = text.lines().skip(1).collect();
    fs::write(&part, zstd::encode_all((fewer.join("\n") + "\n").as_bytes(), 3).unwrap()).unwrap();
    let r = verify(&snapshot);
    assert_eq!(r.code(), Some(1), "{}", r.show());
    assert!(r.stdout.contains("the manifest says 5 messages, its records are 4"), "{}", r.show());
}
