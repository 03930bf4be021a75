//! A manifest is untrusted input: every way one can be wrong is refused by `read` (with the
//! line), and `write` never writes one `read` would refuse.

use std::fs;

use super::*;
use crate::test_support::tmp;

const SUM: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

fn header(folders: u64, messages: u64, bytes: u64) -> Header {
    Header {
        format: FORMAT,
        tool: "test".into(),
        source: "maildir:/m".into(),
        layout: Layout::MaildirPlusPlus,
        taken_at: 1,
        lock_hold_ms: 0,
        folders,
        messages,
        bytes,
        bytes_copied: 0,
        owner: None,
    }
}

fn folder(path: &str, name: &str, messages: u64) -> FolderRecord {
    FolderRecord { messages, ..FolderRecord::new(path.into(), name.into()) }
}

fn message(folder: &str, name: &str, size: u64) -> MessageRecord {
    let n = MessageName::parse(name).unwrap();
    MessageRecord { folder: folder.into(), dir: Subdir::Cur, name: name.into(), unique: n.unique().into(), flags: n.flags().into(), size, blake3: SUM.into() }
}

fn good() -> Manifest {
    Manifest {
        header: header(2, 2, 30),
        folders: vec![folder("", "INBOX", 1), folder(".Sent", "Sent", 1)],
        messages: vec![message("", "a.M1P1.h:2,S", 10), message(".Sent", "b.M2P2.h:2,", 20)],
    }
}

/// The lines `write` writes for `m` (written unchecked, as a hostile hand would).
fn lines_of(m: &Manifest) -> Vec<String> {
    let mut v = vec![serde_json::to_string(&Record::Backup(m.header.clone())).unwrap()];
    v.extend(m.folders.iter().map(|f| serde_json::to_string(&Record::Folder(f.clone())).unwrap()));
    v.extend(m.messages.iter().map(|r| serde_json::to_string(&Record::Message(r.clone())).unwrap()));
    v
}

/// Reads a manifest made of `lines`.
fn read_lines(lines: &[String]) -> Result<Manifest, ManifestError> {
    let t = tmp();
    fs::write(t.path().join(MANIFEST_NAME), lines.join("\n") + "\n").unwrap();
    Manifest::read(&Dir::open(t.path()).unwrap())
}

/// `read` refuses it at `line` with a message containing `what`, and `write` refuses it too.
fn refused(m: &Manifest, line: usize, what: &str) {
    match read_lines(&lines_of(m)) {
        Err(ManifestError::Bad { line: l, what: w, .. }) => {
            assert!(w.contains(what), "expected {what:?}, got {w:?}");
            assert_eq!(l, line, "{w}");
        }
        other => panic!("expected a refusal ({what}), got {other:?}"),
    }
    let t = tmp();
    let dir = Dir::open(t.path()).unwrap();
    assert!(matches!(m.write(&dir), Err(ManifestError::Bad { .. })), "write accepted what read refuses ({what})");
    assert!(!t.path().join(MANIFEST_NAME).exists());
}

#[test]
fn a_good_manifest_round_trips() {
    let t = tmp();
    let dir = Dir::open(t.path()).unwrap();
    good().write(&dir).unwrap();
    assert_eq!(Manifest::read(&dir).unwrap(), good());
    assert_eq!(Manifest::read_header(&dir).unwrap(), good().header);
    // Empty lines are tolerated.
    let mut lines = lines_of(&good());
    lines.insert(2, String::new());
    assert_eq!(read_lines(&lines).unwrap(), good());
}

#[test]
fn folder_paths_that_climb_out_or_are_not_folders_are_refused() {
    for bad in ["..", "../x", "/etc", ".a/../..", ".Sent/..", "Sent", ".a/b", "cur", ".x\n", "./.Sent"] {
        let mut m = good();
        m.folders[1].path = bad.into();
        m.messages[1].folder = bad.into();
        refused(&m, 3, "folder");
    }
    let mut m = good();
    m.header.layout = Layout::Fs;
    m.folders[1].path = "a/new".into();
    m.messages[1].folder = "a/new".into();
    refused(&m, 3, "not folders");
}

#[test]
fn unusable_folder_names_are_refused() {
    for bad in ["", "Sent\n", "\x1b[2J", &"x".repeat(4097)] {
        let mut m = good();
        m.folders[1].name = bad.to_string();
        refused(&m, 3, "folder name");
    }
}

#[test]
fn message_records_that_name_files_outside_are_refused() {
    for bad in ["../../etc/passwd", "a/b", "..", "x\ny", ".hidden", ""] {
        let mut m = good();
        m.messages[1].name = bad.into();
        m.messages[1].unique = bad.into();
        m.messages[1].flags = String::new();
        refused(&m, 5, "not usable");
    }
    // A message whose folder climbs out: refused on its own line.
    let mut m = good();
    m.messages[1].folder = "../..".into();
    refused(&m, 5, "folder");
}

#[test]
fn records_that_disagree_with_themselves_are_refused() {
    let mut m = good();
    m.messages[0].unique = "other".into();
    refused(&m, 4, "do not match");
    let mut m = good();
    m.messages[0].flags = "FS".into();
    refused(&m, 4, "do not match");
    for bad in ["abc", &SUM.to_uppercase().replace('A', "G"), &format!("{SUM}00")] {
        let mut m = good();
        m.messages[0].blake3 = bad.to_string();
        refused(&m, 4, "checksum");
    }
    // No checksum at all is a link snapshot's record (sizes only), not a bad one.
    let mut m = good();
    m.messages[0].blake3 = String::new();
    let back = read_lines(&lines_of(&m)).unwrap();
    assert_eq!(back.messages[0].blake3, "");
}

#[test]
fn counts_that_disagree_are_refused() {
    let mut m = good();
    m.header.messages = 3;
    refused(&m, 1, "the header counts");
    let mut m = good();
    m.header.bytes = 31;
    refused(&m, 1, "bytes");
    let mut m = good();
    m.folders[0].messages = 2;
    refused(&m, 1, "says 2 messages");
    let mut m = good();
    m.messages[1].folder = ".Other".into();
    refused(&m, 1, "which has no record");
    let mut m = good();
    m.folders[1].path = String::new();
    refused(&m, 1, "listed twice");
    let mut m = good();
    m.messages[1] = m.messages[0].clone();
    m.folders = vec![folder("", "INBOX", 2), folder(".Sent", "Sent", 0)];
    m.header.bytes = 20;
    refused(&m, 1, "listed twice");
    let mut m = good();
    m.messages[0].size = u64::MAX;
    refused(&m, 1, "overflow");
}

#[test]
fn broken_structure_is_refused() {
    let lines = lines_of(&good());
    let bad = |lines: Vec<String>, what: &str, line: usize| match read_lines(&lines) {
        Err(ManifestError::Bad { line: l, what: w, .. }) => assert!(w.contains(what) && l == line, "expected {what:?} at {line}, got {w:?} at {l}"),
        other => panic!("expected {what}: {other:?}"),
    };
    bad(lines[1..].to_vec(), "no backup header", 1);
    bad(vec![String::new(), String::new()], "no backup header", 3);
    bad([lines.clone(), vec![lines[0].clone()]].concat(), "a second header", 6);
    bad([lines.clone(), vec!["{not json".into()]].concat(), "", 6);
    bad([lines.clone(), vec![r#"{"kind":"other"}"#.into()]].concat(), "", 6);
    let mut m = good();
    m.header.format = FORMAT_STORE + 1;
    bad(lines_of(&m), "manifest format", 1);
}

#[test]
fn an_oversized_line_is_refused_without_reading_on() {
    let t = tmp();
    let mut content = lines_of(&good()).join("\n");
    content.push('\n');
    content.push_str(&"x".repeat((LINE_LIMIT + 10) as usize));
    fs::write(t.path().join(MANIFEST_NAME), content).unwrap();
    match Manifest::read(&Dir::open(t.path()).unwrap()) {
        Err(ManifestError::Bad { line: 6, what, .. }) => assert!(what.contains("line longer than"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_manifest_that_is_not_a_regular_file_is_not_read() {
    let t = tmp();
    fs::write(t.path().join("elsewhere"), lines_of(&good()).join("\n")).unwrap();
    std::os::unix::fs::symlink(t.path().join("elsewhere"), t.path().join(MANIFEST_NAME)).unwrap();
    let dir = Dir::open(t.path()).unwrap();
    assert!(matches!(Manifest::read(&dir), Err(ManifestError::Fs(FsError::Symlink { .. }))));
    fs::remove_file(t.path().join(MANIFEST_NAME)).unwrap();
    nix::unistd::mkfifo(&t.path().join(MANIFEST_NAME), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(matches!(Manifest::read(&dir), Err(ManifestError::Fs(FsError::NotRegular { .. }))), "a FIFO never blocks us");
}

/// The streaming writer checks what `read` checks that it can without keeping the records: each
/// record, a message's folder, and the counts at `finish`; `visit` reads back what it wrote.
#[test]
fn the_writer_refuses_what_read_would() {
    let t = tmp();
    let dir = Dir::open(t.path()).unwrap();
    let m = good();
    let write = |header: &Header, folders: &[FolderRecord], messages: &[MessageRecord]| -> Result<(), ManifestError> {
        let _ = dir.unlink(MANIFEST_NAME);
        let mut w = ManifestWriter::create(&dir, header)?;
        folders.iter().try_for_each(|f| w.folder(f))?;
        messages.iter().try_for_each(|r| w.message(r))?;
        w.finish()
    };
    let err = |r: Result<(), ManifestError>| r.unwrap_err().to_string();
    assert!(err(write(&header(2, 3, 30), &m.folders, &m.messages)).contains("the header counts"));
    assert!(err(write(&m.header, &m.folders[..1], &m.messages)).contains("which has no record"));
    assert!(err(write(&m.header, &[m.folders[0].clone(), m.folders[0].clone()], &m.messages)).contains("listed twice"));
    let mut wrong = m.folders.clone();
    wrong[0].messages = 2;
    assert!(err(write(&header(2, 2, 30), &wrong, &m.messages)).contains("says 2 messages"));
    let mut unsafe_name = m.messages.clone();
    unsafe_name[0].name = "../x:2,".into();
    assert!(err(write(&m.header, &m.folders, &unsafe_name)).contains("not usable"));
    write(&m.header, &m.folders, &m.messages).unwrap();
    assert!(fs::read(t.path().join(MANIFEST_NAME)).unwrap().starts_with(&ZSTD_MAGIC), "written uncompressed");
    let (mut folders, mut messages) = (vec![], vec![]);
    let h = Manifest::visit(&dir, |f| folders.push(f), |r| messages.push(r)).unwrap();
    assert_eq!(Manifest { header: h, folders, messages }, m);
}

/// A manifest compressed with a bigger window than ours needs is refused, not decoded into memory.
#[test]
fn a_compressed_manifest_with_a_huge_window_is_refused() {
    let t = tmp();
    let text = lines_of(&good()).join("\n") + "\n";
    let mut e = zstd::Encoder::new(Vec::new(), 1).unwrap();
    e.window_log(27).unwrap();
    e.long_distance_matching(true).unwrap();
    e.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut e, text.as_bytes()).unwrap();
    fs::write(t.path().join(MANIFEST_NAME), e.finish().unwrap()).unwrap();
    let err = Manifest::read(&Dir::open(t.path()).unwrap()).unwrap_err().to_string();
    assert!(err.contains("memory"), "{err}");
    // The same lines compressed as we compress them read back.
    fs::write(t.path().join(MANIFEST_NAME), zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
    assert_eq!(Manifest::read(&Dir::open(t.path()).unwrap()).unwrap(), good());
}

/// A repository series with snapshot `snap` whose manifest is `lines`, and store entry `ID`
/// holding `part` as its message records.
fn stored_series(lines: &[String], part: &[String]) -> tempfile::TempDir {
    let t = tmp();
    fs::create_dir_all(t.path().join("snap")).unwrap();
    fs::write(t.path().join("snap").join(MANIFEST_NAME), lines.join("\n") + "\n").unwrap();
    let entry = t.path().join(crate::store::STORE_DIR).join(ID);
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join(crate::store::PART_NAME), part.join("\n") + "\n").unwrap();
    t
}

const ID: &str = "0123456789abcdef0123456789abcdef";

/// The good manifest with Sent's message in store entry `ID`: (manifest lines, part lines).
fn good_stored() -> (Vec<String>, Vec<String>) {
    let mut m = good();
    m.header.format = FORMAT_STORE;
    m.folders[1].store = Some(ID.into());
    m.folders[1].bytes = Some(20);
    let part = vec![serde_json::to_string(&Record::Message(m.messages.pop().unwrap())).unwrap()];
    (lines_of(&m), part)
}

fn read_stored(lines: &[String], part: &[String]) -> Result<Manifest, ManifestError> {
    let t = stored_series(lines, part);
    Manifest::read(&Dir::open(&t.path().join("snap")).unwrap())
}

#[test]
fn a_stored_folder_is_read_from_its_entry() {
    let (lines, part) = good_stored();
    let m = read_stored(&lines, &part).unwrap();
    assert_eq!(m.messages, good().messages);
}

#[test]
fn a_forged_store_reference_is_refused() {
    let bad = |lines: Vec<String>, part: Vec<String>, what: &str| match read_stored(&lines, &part) {
        Err(ManifestError::Bad { what: w, .. }) => assert!(w.contains(what), "expected {what:?}, got {w:?}"),
        Err(ManifestError::Fs(e)) => assert!(what.is_empty(), "expected {what:?}, got {e}"),
        other => panic!("expected {what}: {other:?}"),
    };
    let (lines, part) = good_stored();
    // A plain backup's manifest naming the store.
    let mut plain = lines.clone();
    plain[0] = plain[0].replace("\"format\":2", "\"format\":1");
    bad(plain, part.clone(), "plain backup");
    // The entry holds another folder's message, or more than the folder record says.
    bad(lines.clone(), vec![part[0].replace(".Sent", ".Other")], "not \".Sent\"");
    bad(lines.clone(), vec![part[0].clone(), part[0].replace("b.M2P2", "c.M3P3")], "holds 2");
    // A message of a stored folder in the manifest itself as well.
    bad([lines.clone(), part.clone()].concat(), part.clone(), "in the store");
    // An entry name that climbs out, or a record that is not a message.
    bad(lines.iter().map(|l| l.replace(ID, "../../etc")).collect(), part.clone(), "");
    bad(lines.clone(), vec![lines[1].clone()], "unknown variant `folder`");
}
