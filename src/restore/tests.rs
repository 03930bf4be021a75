//! Restore selection (`select`, `group_by_target_folder`), the dry run and a few real restores,
//! from snapshots made by a real backup of a hand-made Maildir (no Dovecot).

use std::fs;
use std::time::Duration;

use super::*;
use crate::engine::BackupOptions;
use crate::test_support::*;

/// A backup of a hand-made Maildir: INBOX (uids 1, 2), Sent (uid 1), Archive.2024 (no
/// uidlist), and a message hard-linked into INBOX and Sent (Dovecot's COPY).
struct Snap {
    t: tempfile::TempDir,
    path: PathBuf,
    dir: Dir,
    manifest: Manifest,
}

const A: &str = "1700000001.M1P1.host,S=10";
const B: &str = "1700000002.M2P2.host,S=20";
const S: &str = "1700000003.M3P3.host,S=30";
const OLD: &str = "1700000004.M4P4.host,S=40";
/// Expunged: in INBOX's uidlist as uid 3, but no file.
const GONE: &str = "1700000005.M5P5.host";

fn snapshot_of(layout: Layout) -> Snap {
    let t = tmp();
    let src = t.path().join("Maildir");
    let (sent, archive) = match layout {
        Layout::MaildirPlusPlus => (".Sent", ".Archive.2024"),
        Layout::Fs => ("Sent", "Archive/2024"),
    };
    make_maildir(&src, &[sent, archive]);
    if layout == Layout::Fs {
        make_folder(&src.join("Archive"));
    }
    put(&src, "cur", &format!("{A}:2,S"), &body(A));
    put(&src, "new", B, &body(B));
    let s = put(&src.join(sent), "cur", &format!("{S}:2,RS"), &body(S));
    fs::hard_link(&s, src.join("cur").join(format!("{S}:2,S"))).unwrap();
    put(&src.join(archive), "cur", &format!("{OLD}:2,"), &body(OLD));
    fs::write(src.join("dovecot-uidlist"), format!("3 V1700000000 N5 G0123456789abcdef\n1 :{A}\n2 :{B}\n3 :{GONE}\n4 :{S}\n")).unwrap();
    fs::write(src.join(sent).join("dovecot-uidlist"), format!("3 V1700000100 N2 Gfedcba9876543210\n1 :{S}\n")).unwrap();
    let loc = MailLocation { layout, ..MailLocation::plain(&src) };
    let path = t.path().join("snap");
    let opts = BackupOptions { jobs: 2, ..Default::default() };
    backup(&loc, &path, &opts).unwrap();
    let dir = crate::repo::open_snapshot(&path).unwrap();
    let manifest = Manifest::read(&dir).unwrap();
    Snap { t, path, dir, manifest }
}

fn req() -> RestoreRequest {
    RestoreRequest { lock: LockSettings { timeout: Duration::from_secs(5), ..LockSettings::default() }, ..Default::default() }
}

/// What `select` picks: (folder path, unique name), sorted.
fn picked(snap: &Snap, r: &RestoreRequest) -> Result<Vec<(String, String)>, RestoreError> {
    let sel = select(&snap.dir, &snap.manifest, r)?;
    Ok(sel.iter().map(|s| (s.folder.path.clone(), s.msg.unique.clone())).collect())
}

fn p(folder: &str, unique: &str) -> (String, String) {
    (folder.to_string(), unique.to_string())
}

#[test]
fn the_snapshot_is_what_the_test_expects() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let folders: Vec<(&str, &str)> = snap.manifest.folders.iter().map(|f| (f.path.as_str(), f.name.as_str())).collect();
    assert_eq!(folders, [("", "INBOX"), (".Archive.2024", "Archive.2024"), (".Sent", "Sent")]);
    assert_eq!(snap.manifest.messages.len(), 5);
    let inbox = &snap.manifest.folders[0];
    assert_eq!(inbox.uidlist_header.as_deref(), Some("3 V1700000000 N5 G0123456789abcdef"));
    assert_eq!(inbox.uidlist_expunged, [GONE]);
    assert!(snap.path.join("dovecot-uidlist").is_file());
}

#[test]
fn nothing_asked_selects_everything() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    assert_eq!(picked(&snap, &req()).unwrap(), [p("", A), p("", B), p("", S), p(".Archive.2024", OLD), p(".Sent", S)]);
}

#[test]
fn folders_are_selected_by_name_or_path() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    for names in [&["Sent"][..], &[".Sent"], &["Sent", ".Sent"]] {
        let r = RestoreRequest { folders: names.iter().map(|s| s.to_string()).collect(), ..req() };
        assert_eq!(picked(&snap, &r).unwrap(), [p(".Sent", S)], "{names:?}");
    }
    let r = RestoreRequest { folders: vec!["INBOX".into(), "Archive.2024".into()], ..req() };
    assert_eq!(picked(&snap, &r).unwrap(), [p("", A), p("", B), p("", S), p(".Archive.2024", OLD)]);
}

#[test]
fn messages_are_selected_by_unique_name_and_not_twice() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let r = RestoreRequest { messages: vec![B.into(), OLD.into()], ..req() };
    assert_eq!(picked(&snap, &r).unwrap(), [p("", B), p(".Archive.2024", OLD)]);
    // Named both ways: once.
    let r = RestoreRequest { folders: vec!["INBOX".into()], messages: vec![A.into()], uids: vec!["INBOX:1".into()], ..req() };
    assert_eq!(picked(&snap, &r).unwrap(), [p("", A), p("", B), p("", S)]);
}

#[test]
fn messages_are_selected_by_folder_and_uid() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let r = RestoreRequest { uids: vec!["INBOX:2".into(), "Sent:1".into(), ".Sent:1".into(), "INBOX:4".into()], ..req() };
    assert_eq!(picked(&snap, &r).unwrap(), [p("", B), p("", S), p(".Sent", S)]);
}

#[test]
fn a_folder_name_with_a_colon_takes_the_last_colon_for_the_uid() {
    let t = tmp();
    let src = t.path().join("Maildir");
    make_maildir(&src, &[".Work:Old"]);
    put(&src.join(".Work:Old"), "cur", &format!("{A}:2,"), &body(A));
    fs::write(src.join(".Work:Old/dovecot-uidlist"), format!("3 V1 N8 G00\n7 :{A}\n")).unwrap();
    let path = t.path().join("snap");
    backup(&MailLocation::plain(&src), &path, &BackupOptions::default()).unwrap();
    let dir = Dir::open(&path).unwrap();
    let manifest = Manifest::read(&dir).unwrap();
    let snap = Snap { t, path, dir, manifest };
    assert_eq!(picked(&snap, &RestoreRequest { uids: vec!["Work:Old:7".into()], ..req() }).unwrap(), [p(".Work:Old", A)]);
}

#[test]
fn unknown_folders_uids_and_messages_are_usage_errors() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let r = RestoreRequest { folders: vec!["Nope".into()], ..req() };
    match picked(&snap, &r) {
        Err(e @ RestoreError::NoSuchFolder(..)) => {
            let shown = e.to_string();
            assert!(shown.contains("\"Nope\"") && shown.contains("INBOX, Archive.2024, Sent"), "{shown}");
            assert_eq!(e.exit_code(), sysexits::EX_USAGE);
        }
        other => panic!("{other:?}"),
    }
    let r = RestoreRequest { uids: vec!["Nope:1".into()], ..req() };
    assert!(matches!(picked(&snap, &r), Err(RestoreError::NoSuchFolder(..))));
    // A UID the uidlist does not have; one it has for a message expunged before the backup;
    // a folder with no uidlist.
    for (spec, folder, uid) in [("INBOX:99", "INBOX", 99), ("INBOX:3", "INBOX", 3), ("Archive.2024:1", "Archive.2024", 1)] {
        let r = RestoreRequest { uids: vec![spec.into()], ..req() };
        match picked(&snap, &r) {
            Err(RestoreError::NoSuchUid(f, u)) => assert_eq!((f.as_str(), u), (folder, uid), "{spec}"),
            other => panic!("{spec}: {other:?}"),
        }
    }
    let r = RestoreRequest { messages: vec![GONE.into()], ..req() };
    assert!(matches!(picked(&snap, &r), Err(RestoreError::NoSuchMessage(u)) if u == GONE));
    for bad in ["INBOX", "INBOX:", "INBOX:x", "INBOX:-1", "INBOX:1.5", "INBOX:99999999999"] {
        let r = RestoreRequest { uids: vec![bad.into()], ..req() };
        match picked(&snap, &r) {
            Err(e @ RestoreError::BadUid(_)) => assert_eq!(e.exit_code(), sysexits::EX_USAGE),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

/// Target folder paths per snapshot folder path, for a restore into `to`.
fn targets(snap: &Snap, to: Layout) -> Vec<(String, String)> {
    let sel = select(&snap.dir, &snap.manifest, &req()).unwrap();
    let by = group_by_target_folder(&sel, snap.manifest.header.layout, to).unwrap();
    by.iter().map(|(k, (_, rel, _))| (k.to_string(), rel.to_string_lossy().into_owned())).collect()
}

#[test]
fn folders_map_between_layouts() {
    let pp = snapshot_of(Layout::MaildirPlusPlus);
    assert_eq!(targets(&pp, Layout::MaildirPlusPlus), [p("", ""), p(".Archive.2024", ".Archive.2024"), p(".Sent", ".Sent")]);
    assert_eq!(targets(&pp, Layout::Fs), [p("", ""), p(".Archive.2024", "Archive/2024"), p(".Sent", "Sent")]);
    let fs_snap = snapshot_of(Layout::Fs);
    assert_eq!(fs_snap.manifest.header.layout, Layout::Fs);
    // Archive (a folder itself in LAYOUT=fs, with no messages) has nothing selected.
    assert_eq!(targets(&fs_snap, Layout::Fs), [p("", ""), p("Archive/2024", "Archive/2024"), p("Sent", "Sent")]);
    assert_eq!(targets(&fs_snap, Layout::MaildirPlusPlus), [p("", ""), p("Archive/2024", ".Archive.2024"), p("Sent", ".Sent")]);
}

#[test]
fn a_folder_that_maps_to_no_usable_path_is_refused() {
    let snap = snapshot_of(Layout::Fs);
    let sel = select(&snap.dir, &snap.manifest, &req()).unwrap();
    let mut archive = sel.iter().find(|s| s.folder.path == "Archive/2024").unwrap().folder.clone();
    for name in ["..", "a..b", "cur", "x.new"] {
        archive.name = name.to_string();
        let one = [Selected { folder: &archive, msg: sel[0].msg }];
        assert!(matches!(group_by_target_folder(&one, Layout::MaildirPlusPlus, Layout::Fs), Err(RestoreError::BadManifest(_))), "{name}");
    }
}

#[test]
fn a_dry_run_into_a_new_target_would_restore_everything_and_touches_nothing() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let target = snap.t.path().join("new-target");
    let r = restore(&snap.path, &MailLocation::plain(&target), &RestoreRequest { dry_run: true, ..req() }).unwrap();
    assert_eq!((r.mode.as_str(), r.restored, r.skipped), ("full", 5, 0));
    assert!(r.actions.contains(&format!("restore Sent/{S} flags \"RS\"")), "{:?}", r.actions);
    assert!(!target.exists(), "a dry run creates nothing");
}

#[test]
fn a_dry_run_into_a_target_with_mail_skips_what_is_there() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let target = snap.t.path().join("target");
    make_maildir(&target, &[".Sent"]);
    // A by unique name (other flags), S in Sent by content under another name.
    put(&target, "cur", &format!("{A}:2,FS"), &body(A));
    put(&target.join(".Sent"), "cur", "1800000000.M9P9.elsewhere,S=30:2,S", &body(S));
    let before = message_files(&target);
    let r = restore(&snap.path, &MailLocation::plain(&target), &RestoreRequest { dry_run: true, ..req() }).unwrap();
    assert_eq!((r.mode.as_str(), r.restored, r.skipped), ("merge", 3, 2));
    assert!(r.actions.contains(&format!("skip INBOX/{A} (already in the target)")), "{:?}", r.actions);
    assert!(r.actions.contains(&format!("skip Sent/{S} (already in the target)")), "{:?}", r.actions);
    assert_eq!(message_files(&target), before);
    assert!(!target.join(".Archive.2024").exists());
}

#[test]
fn a_dry_run_checks_the_snapshot_first() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    fs::write(snap.path.join("new").join(B), b"tampered").unwrap();
    let target = snap.t.path().join("t");
    let r = restore(&snap.path, &MailLocation::plain(&target), &RestoreRequest { dry_run: true, ..req() });
    assert!(matches!(r, Err(RestoreError::Corrupt(ref bad)) if bad.len() == 1 && bad[0].contains(B)), "{r:?}");
    // Only what is selected is checked.
    let only_sent = RestoreRequest { dry_run: true, folders: vec!["Sent".into()], ..req() };
    assert_eq!(restore(&snap.path, &MailLocation::plain(&target), &only_sent).unwrap().restored, 1);
}

#[test]
fn a_full_restore_into_another_layout_keeps_names_and_uidlists() {
    let snap = snapshot_of(Layout::MaildirPlusPlus);
    let target = snap.t.path().join("restored");
    let loc = MailLocation { layout: Layout::Fs, ..MailLocation::plain(&target) };
    let r = restore(&snap.path, &loc, &req()).unwrap();
    assert_eq!((r.mode.as_str(), r.restored, r.skipped), ("full", 5, 0));
    assert_eq!(fs::read(target.join("Sent/cur").join(format!("{S}:2,RS"))).unwrap(), body(S));
    assert_eq!(fs::read(target.join("Archive/2024/cur").join(format!("{OLD}:2,"))).unwrap(), body(OLD));
    assert!(target.join(format!("new/{B}")).is_file());
    assert_eq!(fs::read_to_string(target.join("Sent/dovecot-uidlist")).unwrap(), format!("3 V1700000100 N2 Gfedcba9876543210\n1 :{S}\n"));
    // One copy for the two names of S, as in the snapshot.
    assert_eq!(ino(&target.join("Sent/cur").join(format!("{S}:2,RS"))), ino(&target.join("cur").join(format!("{S}:2,S"))));
    assert!(!target.join("Sent/maildirfolder").exists(), "maildirfolder is for Maildir++ only");
    // Again: everything is there now.
    let again = restore(&snap.path, &loc, &req()).unwrap();
    assert_eq!((again.mode.as_str(), again.restored, again.skipped), ("merge", 0, 5));
    let files = message_files(&target);
    assert_eq!(files.len(), 5, "{files:?}");
}
