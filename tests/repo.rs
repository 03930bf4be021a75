//! The snapshot repository: `backup --repo`, `snapshots`, `prune`, `--paranoid`, against a real Dovecot.
//!
//! - `incremental_snapshots_link_unchanged_and_copy_only_new`: 1,000 messages in 4 folders; after the first
//!   snapshot, 10 % get their flags changed through IMAP (UID STORE + NOOP, so Dovecot renames the files) and
//!   1 % are delivered by dovecot-lda. In the second snapshot exactly the delivered messages have link count 1
//!   (everything else, renamed ones included, is the previous snapshot's inode), `bytes_copied` is exactly their
//!   size, both snapshots verify. `snapshots REPO` / `REPO/NAME` (--json) agree with the manifests, `latest`
//!   names the newest, a second user's series lives beside it. A third snapshot under IMAP + LDA churn
//!   verifies, loses nothing that existed before it started and was not expunged, and links exactly the
//!   messages the previous snapshot has.
//! - `paranoid_recopies_a_corrupted_previous_copy`: a size-preserving corruption of a message that only the
//!   latest snapshot holds is carried into the next snapshot by a hard link without `--paranoid` (and only
//!   `verify` notices), while `--paranoid` copies it afresh from the source.
//! - `prune_keeps_exactly_what_the_policy_names`: ten real snapshots renamed to chosen times over four months;
//!   `--dry-run` removes nothing, the real prune leaves exactly the hand-computed set, all keeps 0 still
//!   leaves the newest (of every series, with REPO given), and every survivor verifies.
//! - `snapshots_hold_the_dovecot_locks_briefly_even_when_threads_start_late`: lock hold stays short when
//!   the CLI's threads start late (LD_PRELOAD shim); 10 s per snapshot before the refresher fix.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::churn::{self, Churn, ChurnOptions, Tracker};
use support::repo_helpers::*;
use support::*;

const USER: &str = "alice";

/// Sets `series/latest` to `name` (as the tool does: a relative symlink).
fn point_latest(series: &Path, name: &str) {
    let l = series.join("latest");
    let _ = fs::remove_file(&l);
    std::os::unix::fs::symlink(name, &l).unwrap();
}

fn latest_target(series: &Path) -> String {
    fs::read_link(series.join("latest")).unwrap().display().to_string()
}

fn snapshot_dirs(series: &Path) -> BTreeSet<String> {
    fs::read_dir(series)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".store")
        .collect()
}

/// The store entries of a series, those its snapshots' folders link to, and those they need:
/// the linked ones and the bases whose records those are written against.
fn store_entries(series: &Path) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let names = |d: &Path| fs::read_dir(d).map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect::<BTreeSet<_>>()).unwrap_or_default();
    let entries = names(&series.join(".store")).into_iter().filter(|n| !n.starts_with('.')).collect();
    let mut linked = Vec::new();
    for s in snapshot_dirs(series) {
        for f in churn::all_files(&series.join(s)).into_iter().filter(|f| matches!(f.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()), Some("cur") | Some("new"))) {
            let link = fs::read_link(f.parent().unwrap()).unwrap();
            linked.push(link.iter().rev().nth(1).unwrap().to_string_lossy().into_owned());
        }
    }
    let needed = with_bases(&series.join(".store"), linked.clone());
    (entries, linked.into_iter().collect(), needed)
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Checks a snapshot against the one before it: a file has link count 1 exactly when the previous snapshot
/// has no message of that unique name and size; otherwise it is the previous snapshot's inode. Returns the
/// files with link count 1.
fn check_links_against_previous(prev: &Path, cur: &Path) -> Vec<PathBuf> {
    let pm = read_manifest(prev);
    let mut by_unique: HashMap<&str, Vec<&ManifestMsg>> = HashMap::new();
    for m in &pm.messages {
        by_unique.entry(m.unique.as_str()).or_default().push(m);
    }
    let mut singles = Vec::new();
    let mut problems = Vec::new();
    for f in message_files(cur) {
        let size = fs::metadata(&f).unwrap().len();
        let candidates: Vec<&&ManifestMsg> = by_unique.get(unique_of(&f).as_str()).map(|v| v.iter().filter(|m| m.size == size).collect()).unwrap_or_default();
        let n = nlink(&f);
        if candidates.is_empty() {
            if n != 1 {
                problems.push(format!("{}: new message but link count {n}", f.display()));
            }
            singles.push(f);
        } else if !candidates.iter().any(|m| inode(&m.path_in(prev)) == inode(&f)) {
            problems.push(format!("{}: in the previous snapshot but not linked to it (link count {n})", f.display()));
        }
    }
    assert!(problems.is_empty(), "{} link problems in {}:\n{}", problems.len(), cur.display(), problems[..problems.len().min(10)].join("\n"));
    singles
}

/// `snapshots PATH --json` rows as (series name, snapshot name) → row.
fn snapshot_rows(path: &Path) -> BTreeMap<(String, String), serde_json::Value> {
    let r = cli_ok(&["snapshots".to_string(), path.display().to_string(), "--json".to_string()]);
    r.json()
        .as_array()
        .unwrap_or_else(|| panic!("not an array:\n{}", r.show()))
        .iter()
        .map(|row| ((row["name"].as_str().unwrap().to_string(), row["snapshot"].as_str().unwrap().to_string()), row.clone()))
        .collect()
}

/// A row of `snapshots --json` must say what the snapshot's manifest says.
fn check_row_against_manifest(row: &serde_json::Value, snapshot: &Path) {
    let m = read_manifest(snapshot);
    assert_eq!(row["messages"].as_u64(), Some(m.messages.len() as u64), "messages of {}: {row}", snapshot.display());
    assert_eq!(row["messages"], m.header["messages"], "{row}");
    assert_eq!(row["bytes"].as_u64(), Some(m.messages.iter().map(|x| x.size).sum::<u64>()), "bytes of {}: {row}", snapshot.display());
    assert_eq!(row["new_bytes"], m.header["bytes_copied"], "new bytes of {}: {row}", snapshot.display());
    assert_eq!(PathBuf::from(row["path"].as_str().unwrap()), snapshot, "{row}");
}

#[test]
fn incremental_snapshots_link_unchanged_and_copy_only_new() {
    let t0 = Instant::now();
    const FOLDERS: &[&str] = &["INBOX", "Work", "Lists", "Archive"];
    const PER_FOLDER: usize = 250;
    let d = start_with_users(&[USER, "bob"]);
    populate(&d, USER, FOLDERS, PER_FOLDER);
    populate(&d, "bob", &["INBOX", "Sent"], 25);
    let source = d.mail_location(USER);
    let root = d.maildir(USER);
    let repo_tmp = tempdir();
    let repo = repo_tmp.path().join("repo");
    fs::create_dir(&repo).unwrap();
    let series = repo.join(USER);

    // Snapshot 1: everything copied.
    let (s1, j1) = take_snapshot(&source, &repo, USER, &[]);
    assert_eq!(j1["messages"].as_u64(), Some((FOLDERS.len() * PER_FOLDER) as u64), "{j1}");
    assert_eq!(j1["bytes_copied"], j1["bytes"], "the first snapshot copies everything: {j1}");
    assert_eq!(j1["messages_linked"].as_u64(), Some(0), "{j1}");
    assert_eq!(latest_target(&series), name_of(&s1));
    let t_first = t0.elapsed();

    // 10 %: flag changes through IMAP. UIDs 1, 11, 21, ... 241 of every folder (message j = uid - 1 has the
    // flags populate_flags(j); j is even, so \Seen is set): every other one loses \Seen, the others get $Later.
    let mut imap = d.imap(USER);
    let mut changed_mids: HashSet<String> = HashSet::new();
    for f in FOLDERS {
        imap.select(f).unwrap();
        let uids: Vec<u32> = (0..25).map(|k| 1 + 10 * k).collect();
        let all = mid_flags(&mut imap);
        let (a, b): (Vec<u32>, Vec<u32>) = uids.iter().partition(|&&u| (u / 10) % 2 == 0);
        let set = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        imap.uid_store(&set(&a), "+FLAGS", "$Later").unwrap();
        imap.uid_store(&set(&b), "-FLAGS", "\\Seen").unwrap();
        imap.noop().unwrap();
        for u in &uids {
            changed_mids.insert(all[u].0.clone());
        }
        // Dovecot really renamed them: the flags on disk are the new ones.
        let now = mid_flags(&mut imap);
        for u in &a {
            assert!(now[u].1.contains("$Later"), "uid {u} in {f}: {:?}", now[u]);
        }
        for u in &b {
            assert!(!now[u].1.contains("\\Seen"), "uid {u} in {f}: {:?}", now[u]);
        }
    }
    assert_eq!(changed_mids.len(), FOLDERS.len() * PER_FOLDER / 10);
    let src_ids = churn::scan_message_ids(&root);
    let kw = churn::read_keywords(&root);
    assert!(kw.values().any(|k| k == "$Later"), "Dovecot wrote no $Later keyword: {kw:?}");

    // 1 %: deliveries with dovecot-lda, spread over the folders.
    let mut delivered: HashSet<String> = HashSet::new();
    for i in 0..(FOLDERS.len() * PER_FOLDER / 100) {
        let msg = message(900_000 + i, 700 + 311 * i);
        delivered.insert(churn::message_id_in(&msg).unwrap());
        let f = FOLDERS[i % FOLDERS.len()];
        d.deliver(USER, if f == "INBOX" { None } else { Some(f) }, &msg);
    }
    let src_ids_after = churn::scan_message_ids(&root);
    let delivered_bytes: u64 = delivered
        .iter()
        .map(|mid| {
            let files = &src_ids_after[mid];
            assert_eq!(files.len(), 1, "{mid}: {files:?}");
            fs::metadata(&files[0]).unwrap().len()
        })
        .sum();

    // Snapshot 2: only the delivered messages are new files; everything else is a link to snapshot 1.
    let (s2, j2) = take_snapshot(&source, &repo, USER, &[]);
    assert_ne!(s1, s2);
    assert_eq!(j2["messages"].as_u64(), Some((FOLDERS.len() * PER_FOLDER + delivered.len()) as u64), "{j2}");
    assert_eq!(j2["messages_linked"].as_u64(), Some((FOLDERS.len() * PER_FOLDER) as u64), "{j2}");
    let singles: Vec<PathBuf> = message_files(&s2).into_iter().filter(|f| nlink(f) == 1).collect();
    assert_eq!(singles.len(), delivered.len(), "files with link count 1 in {}: {singles:?}", s2.display());
    let single_mids: HashSet<String> = singles.iter().map(|f| churn::message_id_of(f).unwrap()).collect();
    assert_eq!(single_mids, delivered, "the files with link count 1 are not exactly the delivered messages");
    let single_bytes: u64 = singles.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert_eq!(single_bytes, delivered_bytes);
    assert_eq!(j2["bytes_copied"].as_u64(), Some(delivered_bytes), "bytes_copied must be the new messages' bytes: {j2}");
    check_links_against_previous(&s1, &s2);
    // A renamed (flag-changed) message is the same inode under its new name.
    let (ids1, ids2) = (churn::scan_message_ids(&s1), churn::scan_message_ids(&s2));
    for mid in &changed_mids {
        let (a, b) = (&ids1[mid][0], &ids2[mid][0]);
        assert_ne!(a.file_name(), b.file_name(), "{mid}: flag change not in the snapshot");
        assert_eq!(b.file_name(), src_ids[mid][0].file_name(), "{mid}: snapshot name differs from the source's");
        assert_eq!(inode(a), inode(b), "{mid}: renamed message was not linked");
    }
    assert_verifies(&s1);
    assert_verifies(&s2);
    assert_eq!(latest_target(&series), name_of(&s2), "latest must name the newest snapshot");

    // A second user under another name, beside the first.
    let (sb, jb) = take_snapshot(&d.mail_location("bob"), &repo, "bobby", &[]);
    assert_eq!(sb.parent().unwrap(), repo.join("bobby"));
    assert_eq!(jb["messages"].as_u64(), Some(50), "{jb}");
    assert_eq!(latest_target(&repo.join("bobby")), name_of(&sb));
    assert_eq!(latest_target(&series), name_of(&s2), "another series must not move alice's latest");
    assert_verifies(&sb);

    // snapshots REPO and REPO/NAME.
    let all = snapshot_rows(&repo);
    let keys: BTreeSet<(String, String)> = all.keys().cloned().collect();
    let want: BTreeSet<(String, String)> = [(USER, &s1), (USER, &s2), ("bobby", &sb)].iter().map(|(n, s)| (n.to_string(), name_of(s))).collect();
    assert_eq!(keys, want, "snapshots REPO");
    for ((n, s), row) in &all {
        check_row_against_manifest(row, &repo.join(n).join(s));
    }
    assert_eq!(all[&(USER.to_string(), name_of(&s2))]["new_bytes"].as_u64(), Some(delivered_bytes));
    let one = snapshot_rows(&series);
    assert_eq!(one.keys().cloned().collect::<BTreeSet<_>>(), [(USER.to_string(), name_of(&s1)), (USER.to_string(), name_of(&s2))].into_iter().collect());
    for (k, row) in &one {
        assert_eq!(row["messages"], all[k]["messages"]);
        assert_eq!(row["new_bytes"], all[k]["new_bytes"]);
    }
    // The table lists them too.
    let text = cli_ok(&["snapshots".to_string(), repo.display().to_string()]).stdout;
    for (n, s) in &want {
        assert!(text.lines().any(|l| l.starts_with(n.as_str()) && l.contains(s.as_str())), "{n} {s} not in:\n{text}");
    }
    let t_quiet = t0.elapsed();

    // Snapshot 3 while IMAP clients change flags, move, append, expunge and dovecot-lda delivers.
    let tracker = Tracker::new();
    assert_eq!(tracker.register_existing(&root), FOLDERS.len() * PER_FOLDER + delivered.len());
    let churn = Churn::start(
        ChurnOptions {
            port: d.port(),
            conf: d.conf().to_path_buf(),
            user: USER.into(),
            folders: FOLDERS.iter().map(|s| s.to_string()).collect(),
            imap_workers: 3,
            lda: true,
            pace: Duration::from_millis(2),
            lda_pace: Duration::from_millis(30),
            folder_worker: false,
        },
        tracker.clone(),
    );
    churn.wait_ops(40, Duration::from_secs(20));
    let ops_before = churn.ops();
    let start_tick = tracker.tick();
    let (s3, j3) = take_snapshot(&source, &repo, USER, &[]);
    let end_tick = tracker.tick();
    let ops_during = churn.ops() - ops_before;
    let stats = churn.stop();
    assert!(stats.errors.is_empty(), "churn errors: {:?}", stats.errors);
    assert!(ops_during > 0, "no churn during the snapshot");
    assert_eq!(latest_target(&series), name_of(&s3));
    assert_verifies(&s3);
    assert_verifies(&s2);
    let ids3 = churn::scan_message_ids(&s3);
    let required = tracker.required(start_tick, end_tick);
    let lost: Vec<&String> = required.iter().filter(|m| !ids3.contains_key(*m)).collect();
    assert!(lost.is_empty(), "{} of {} required messages missing from the churn snapshot: {:?}", lost.len(), required.len(), &lost[..lost.len().min(5)]);
    let singles3 = check_links_against_previous(&s2, &s3);
    let single_bytes3: u64 = singles3.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
    assert!(j3["bytes_copied"].as_u64().unwrap() >= single_bytes3, "bytes_copied {} < new files' bytes {single_bytes3}: {j3}", j3["bytes_copied"]);
    assert!((singles3.len() as u64) < j3["messages"].as_u64().unwrap() / 4, "implausibly many copies under churn: {}", singles3.len());
    eprintln!(
        "incremental: first snapshot after {:.1?}, quiet part {:.1?}, churn snapshot {} messages ({} new files, {} churn ops during it, {:?}), total {:.1?}",
        t_first,
        t_quiet,
        j3["messages"],
        singles3.len(),
        ops_during,
        stats,
        t0.elapsed()
    );
}

#[test]
fn paranoid_recopies_a_corrupted_previous_copy() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive"], 40);
    let source = d.mail_location(USER);
    let root = d.maildir(USER);
    let repo_tmp = tempdir();
    let repo = repo_tmp.path().to_path_buf();

    let (_s1, _) = take_snapshot(&source, &repo, USER, &[]);
    let x = message(777_001, 2500);
    let y = message(777_002, 1800);
    let (x_mid, y_mid) = (churn::message_id_in(&x).unwrap(), churn::message_id_in(&y).unwrap());
    d.deliver(USER, None, &x);
    d.deliver(USER, None, &y);
    let (s2, _) = take_snapshot(&source, &repo, USER, &[]);
    let ids2 = churn::scan_message_ids(&s2);
    let x2 = ids2[&x_mid][0].clone();
    assert_eq!(nlink(&x2), 1, "a new message is only in the latest snapshot");
    let src_x = churn::scan_message_ids(&root)[&x_mid][0].clone();
    let src_sum = blake3_of(&src_x);
    assert_eq!(blake3_of(&x2), src_sum);

    // Bit rot in the latest snapshot's copy of X: same size, same inode, different bytes.
    let size_before = fs::metadata(&x2).unwrap().len();
    flip_bytes(&x2);
    assert_eq!(fs::metadata(&x2).unwrap().len(), size_before);
    assert_ne!(blake3_of(&x2), src_sum);
    let v = verify(&s2);
    assert_ne!(v.code(), Some(0), "verify must notice the corruption:\n{}", v.show());

    // Without --paranoid only names and sizes are compared: the corrupted copy is linked into the new
    // snapshot (same inode), nothing is read from the source, and only verify notices.
    let (s3, j3) = take_snapshot(&source, &repo, USER, &[]);
    let x3 = churn::scan_message_ids(&s3)[&x_mid][0].clone();
    assert_eq!(inode(&x3), inode(&x2), "without --paranoid the previous copy is linked");
    // Linked into a new store entry, or (when INBOX had settled over a second before the
    // previous snapshot listed it, as on a slow machine) the previous entry taken over whole.
    let taken_over = fs::read_link(x3.parent().unwrap()).unwrap() == fs::read_link(x2.parent().unwrap()).unwrap();
    assert_eq!(nlink(&x3), if taken_over { 1 } else { 2 });
    assert_eq!(j3["bytes_copied"].as_u64(), Some(0), "{j3}");
    let v = verify(&s3);
    assert_ne!(v.code(), Some(0), "the linked corrupted copy must fail verify:\n{}", v.show());
    assert!(v.stdout.contains(&x3.file_name().unwrap().to_string_lossy().into_owned()), "verify must name the file:\n{}", v.show());

    // With --paranoid the previous copy's checksum is compared with its manifest: X is copied afresh
    // from the source; intact messages are still linked.
    let (s4, j4) = take_snapshot(&source, &repo, USER, &["--paranoid"]);
    let ids4 = churn::scan_message_ids(&s4);
    let x4 = ids4[&x_mid][0].clone();
    assert_eq!(nlink(&x4), 1, "with --paranoid the corrupted copy must not be linked");
    assert_ne!(inode(&x4), inode(&x3));
    assert_eq!(blake3_of(&x4), src_sum, "the fresh copy must equal the source");
    let m4 = read_manifest(&s4);
    let rec = m4.messages.iter().find(|m| m.name == x4.file_name().unwrap().to_string_lossy()).unwrap();
    assert_eq!(rec.blake3, src_sum);
    assert_eq!(j4["bytes_copied"].as_u64(), Some(size_before), "{j4}");
    assert_eq!(j4["messages_linked"].as_u64(), Some(j4["messages"].as_u64().unwrap() - 1), "{j4}");
    let y4 = &ids4[&y_mid][0];
    assert_eq!(inode(y4), inode(&churn::scan_message_ids(&s3)[&y_mid][0]), "an intact message is still linked with --paranoid");
    assert_verifies(&s4);
    eprintln!("paranoid: {:.1?}", t0.elapsed());
}

/// Snapshot names for the prune test, oldest first, with what `--keep-daily 2 --keep-weekly 2
/// --keep-monthly 2` must do (walking newest first; each rule keeps the newest snapshot of each of its
/// first N distinct days / ISO weeks / months):
const PRUNE_SNAPS: &[(&str, bool)] = &[
    ("2024-12-01T120000Z", false), // month 2024-12: monthly already used up by 2025-03 and 2025-02
    ("2024-12-30T120000Z", false), // Monday of ISO week 2025-W01
    ("2024-12-31T120000Z", false), // ISO week 2025-W01 too
    ("2025-01-31T120000Z", false), // month 2025-01: monthly used up
    ("2025-02-15T120000Z", true),  // month 2025-02: the second monthly
    ("2025-03-03T120000Z", false), // week W10: weekly used up; month 2025-03 already counted
    ("2025-03-12T120000Z", true),  // week W11: the second weekly
    ("2025-03-19T120000Z", true),  // day 03-19: the second daily (week W12, month 03 already counted)
    ("2025-03-20T080000Z", false), // same day, week and month as the newest
    ("2025-03-20T120000Z", true),  // newest: daily 1, weekly 1 (W12), monthly 1 (2025-03)
];

#[test]
fn prune_keeps_exactly_what_the_policy_names() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive"], 15);
    let source = d.mail_location(USER);
    let repo_tmp = tempdir();
    let repo = repo_tmp.path().to_path_buf();
    let series = repo.join(USER);

    // Real snapshots, each renamed to its chosen time; a delivery between two makes every snapshot hold
    // one message of its own and share the rest by hard links with its neighbours.
    let mut own_mid: HashMap<String, String> = HashMap::new();
    for (i, (when, _)) in PRUNE_SNAPS.iter().enumerate() {
        let m = message(880_000 + i, 900);
        own_mid.insert(when.to_string(), churn::message_id_in(&m).unwrap());
        d.deliver(USER, if i % 2 == 0 { None } else { Some("Archive") }, &m);
        let (s, _) = take_snapshot(&source, &repo, USER, &[]);
        fs::rename(&s, series.join(when)).unwrap();
        point_latest(&series, when);
    }
    let all: BTreeSet<String> = PRUNE_SNAPS.iter().map(|(w, _)| w.to_string()).collect();
    let keep: BTreeSet<String> = PRUNE_SNAPS.iter().filter(|(_, k)| *k).map(|(w, _)| w.to_string()).collect();
    let newest = PRUNE_SNAPS.last().unwrap().0.to_string();
    assert_eq!(snapshot_dirs(&series), all);
    // The chain shares inodes: a message delivered before the first snapshot is one inode in all ten.
    let first_files = message_files(&series.join(PRUNE_SNAPS[0].0));
    assert!(first_files.iter().all(|f| nlink(f) >= 2), "snapshots are not hard-linked");

    let policy = ["--keep-daily", "2", "--keep-weekly", "2", "--keep-monthly", "2"];
    let prune = |extra: &[&str], target: &Path| {
        let mut a = vec!["prune".to_string(), target.display().to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        cli_ok(&a)
    };

    // Dry run: says what it would do, changes nothing.
    let before = tree_listing(&repo);
    let mut args: Vec<&str> = policy.to_vec();
    args.push("--dry-run");
    let r = prune(&args, &series);
    assert_same_tree(&before, &tree_listing(&repo), "prune --dry-run");
    let would: BTreeSet<String> = r.stdout.lines().filter_map(|l| l.strip_prefix("would remove ")).map(|p| name_of(Path::new(p))).collect();
    let kept: BTreeSet<String> = r.stdout.lines().filter_map(|l| l.strip_prefix("keep ")).map(|p| name_of(Path::new(p.trim()))).collect();
    assert_eq!(would, &all - &keep, "dry run:\n{}", r.show());
    assert_eq!(kept, keep, "dry run:\n{}", r.show());

    // For real: exactly the named snapshots remain, each whole.
    let r = prune(&policy, &series);
    let removed: BTreeSet<String> = r.stdout.lines().filter_map(|l| l.strip_prefix("removed ")).map(|p| name_of(Path::new(p))).collect();
    assert_eq!(removed, &all - &keep, "{}", r.show());
    let mut left = snapshot_dirs(&series);
    assert_eq!(left, keep, "prune left the wrong snapshots (no leftovers of removal may remain either)");
    // The store keeps exactly what the kept snapshots link to, and the bases of its records.
    let (entries, linked, needed) = store_entries(&series);
    assert!(!linked.is_empty());
    assert_eq!(entries, needed, "the store after the prune:\n{}", r.show());
    // An entry kept only for its records holds no mail: that may be mail deleted long ago.
    assert!(needed.len() > linked.len(), "no entry is kept only for its records: {needed:?}");
    for base in needed.difference(&linked) {
        let entry = series.join(".store").join(base);
        assert!(entry.join("messages").is_file() && !entry.join("cur").exists() && !entry.join("new").exists(), "{base} is kept whole");
    }
    assert_eq!(latest_target(&series), newest);
    for s in &keep {
        let dir = series.join(s);
        assert_verifies(&dir);
        // Its own message (delivered just before it was taken) is still there.
        assert!(churn::scan_message_ids(&dir).contains_key(&own_mid[s]), "{s} lost its own message");
    }
    let rows = snapshot_rows(&series);
    assert_eq!(rows.keys().map(|(_, s)| s.clone()).collect::<BTreeSet<_>>(), keep);

    // A second series in the same repository; then every keep at 0 over the whole repository: the newest
    // of each series survives, nothing else.
    let (o1, _) = take_snapshot(&source, &repo, "other", &[]);
    let (o2, _) = take_snapshot(&source, &repo, "other", &[]);
    let r = prune(&[], &repo);
    left = snapshot_dirs(&series);
    assert_eq!(left, [newest.clone()].into_iter().collect(), "all keeps 0 must still keep the newest:\n{}", r.show());
    assert_eq!(snapshot_dirs(&repo.join("other")), [name_of(&o2)].into_iter().collect(), "{}", r.show());
    assert!(!o1.exists());
    assert_verifies(&series.join(&newest));
    assert_verifies(&o2);
    assert_eq!(latest_target(&series), newest);
    // Again: nothing more to remove.
    let r = prune(&[], &series);
    assert!(!r.stdout.contains("remove"), "{}", r.show());
    assert_eq!(snapshot_dirs(&series), [newest.clone()].into_iter().collect());
    eprintln!("prune: {:.1?}", t0.elapsed());
}

/// A snapshot holds Dovecot's uidlist locks only for its short reconcile, also when the threads it starts
/// are slow to get a CPU (simulated deterministically: an LD_PRELOAD shim delays every new thread's start by
/// 100 ms). Regression test for the lock refresher's lost wake-up: a stop signalled before the refresher
/// thread first ran was slept through, for the whole 10 s touch interval, with every lock still held (IMAP
/// and LDA waited 10 s); on this loaded machine it hit about one ordinary snapshot in five.
#[test]
fn snapshots_hold_the_dovecot_locks_briefly_even_when_threads_start_late() {
    let t0 = Instant::now();
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Archive", "Work"], 10);
    let source = d.mail_location(USER);
    let repo_tmp = tempdir();
    let so = slow_thread_start_so();
    let log = repo_tmp.path().join("slow-threads.log");
    let env: [(&str, &std::ffi::OsStr); 2] = [("LD_PRELOAD", so.as_os_str()), ("SLOW_THREAD_START_LOG", log.as_os_str())];
    let mut holds = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let (snap, j) = take_snapshot_env(&source, repo_tmp.path(), USER, &[], &env);
        holds.push((j["lock_hold_ms"].as_f64().unwrap(), started.elapsed()));
        assert_verifies(&snap);
    }
    let delayed = fs::read_to_string(&log).unwrap_or_default().lines().count();
    assert!(delayed > 0, "the LD_PRELOAD shim was not in effect");
    eprintln!("lock holds (ms, run time) with slow thread starts: {holds:?} ({delayed} threads delayed), {:.1?}", t0.elapsed());
    assert!(holds.iter().all(|(h, _)| *h < 2000.0), "a snapshot held the uidlist locks for seconds: {holds:?}");
}

/// A control file that did not change since the previous snapshot is that snapshot's file (the
/// same inode), one that changed is a fresh copy, and a snapshot made of links verifies and reads
/// back through Dovecot like a copy.
#[test]
fn unchanged_control_files_are_linked_from_the_previous_snapshot() {
    use std::os::unix::fs::MetadataExt;
    let d = start_with_users(&[USER]);
    populate(&d, USER, &["INBOX", "Sent", "Archive"], 4);
    let out = tempdir();
    let repo = out.path().join("repo");
    let source = d.maildir(USER).display().to_string();
    let (s1, _) = take_snapshot(&source, &repo, USER, &[]);
    // Only Sent changes: a new message there gets a UID in its uidlist.
    d.imap(USER).append("Sent", "", &message(7, 500)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (s2, _) = take_snapshot(&source, &repo, USER, &[]);
    let inode = |p: PathBuf| fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).ino();
    // Archive is never opened meanwhile (INBOX may be, by the IMAP session).
    assert_eq!(inode(s2.join(".Archive/dovecot-uidlist")), inode(s1.join(".Archive/dovecot-uidlist")), "Archive's unchanged uidlist was copied again");
    assert_ne!(inode(s2.join(".Sent/dovecot-uidlist")), inode(s1.join(".Sent/dovecot-uidlist")), "Sent's changed uidlist was linked");
    assert_eq!(fs::read(s2.join(".Sent/dovecot-uidlist")).unwrap(), fs::read(d.maildir(USER).join(".Sent/dovecot-uidlist")).unwrap());
    for s in [&s1, &s2] {
        support::readback::assert_verified(s);
    }
    // Dovecot reads as vmail: let it in.
    for dir in [repo.clone(), repo.join(USER)] {
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    chown_vmail_recursive(&s2);
    let store = repo.join(USER).join(".store");
    fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    chown_vmail_recursive(&store);
    support::readback::assert_no_problems("Dovecot reading the linked snapshot", &support::readback::check_dovecot_reads_backup(&d, USER, &s2, false));
}

/// prune runs as root over the series that a mail user's snapshots make (doveadm runs as the
/// user): a store lock that root has to make is given to the series' owner, whose next
/// snapshot must still be able to take it.
#[test]
fn a_store_lock_made_by_root_stays_the_series_owners() {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = ensure_vmail();
    let t = tempdir();
    let (md, repo) = (t.path().join("md"), t.path().join("repo"));
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(md.join(sub)).unwrap();
    }
    fs::write(md.join("cur").join("1700000001.M1P1.h:2,S"), "m").unwrap();
    fs::create_dir(&repo).unwrap();
    chown_vmail_recursive(&md);
    chown_vmail_recursive(&repo);
    let snapshot_as_vmail = || {
        let o = std::process::Command::new("runuser").args(["-u", "vmail", "--", support::run::BIN, "backup", "-q"]).arg(&md).arg("--repo").arg(&repo).args(["--name", "u"]).output().unwrap();
        assert!(o.status.success(), "snapshot as vmail: {}", String::from_utf8_lossy(&o.stderr));
    };
    snapshot_as_vmail();
    let lock = repo.join("u").join(".store").join(".lock");
    fs::remove_file(&lock).unwrap();
    cli_ok(&["prune", repo.to_str().unwrap(), "--keep-last", "1"]);
    let md_lock = fs::metadata(&lock).unwrap();
    assert_eq!((md_lock.uid(), md_lock.gid()), (uid, gid), "root's prune left a store lock the series' owner cannot take");
    std::thread::sleep(Duration::from_millis(1100));
    snapshot_as_vmail();
}

/// A message is linked from the previous snapshot only if its size is the one recorded there:
/// the size in its name (`S=`, part of the unique name) where it has one, else its file's. No
/// Dovecot: a plain Maildir the test writes.
#[test]
fn a_message_is_linked_only_if_its_size_agrees() {
    let out = tempdir();
    let (src, repo) = (out.path().join("Maildir"), out.path().join("repo"));
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(src.join(sub)).unwrap();
    }
    let cur = src.join("cur");
    let (sized, plain, misnamed) = ("1700000001.M1P1.host,S=5", "1700000002.M2P2.host", "1700000003.M3P3.host,S=9");
    fs::write(cur.join(format!("{sized}:2,S")), b"hello").unwrap();
    fs::write(cur.join(format!("{plain}:2,S")), b"abc").unwrap();
    fs::write(cur.join(format!("{misnamed}:2,S")), b"wrong").unwrap();
    let source = src.display().to_string();
    let (s1, _) = take_snapshot(&source, &repo, USER, &[]);

    // Each gets a flag; the one without S= is also rewritten at another size.
    for unique in [sized, plain, misnamed] {
        fs::rename(cur.join(format!("{unique}:2,S")), cur.join(format!("{unique}:2,RS"))).unwrap();
    }
    fs::write(cur.join(format!("{plain}:2,RS")), b"abcdef").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (s2, j2) = take_snapshot(&source, &repo, USER, &[]);
    let (old, new) = (|u: &str| s1.join("cur").join(format!("{u}:2,S")), |u: &str| s2.join("cur").join(format!("{u}:2,RS")));
    assert_eq!(inode(&new(sized)), inode(&old(sized)), "its name's size is the recorded one: linked");
    assert_ne!(inode(&new(plain)), inode(&old(plain)), "its file's size changed: copied afresh");
    assert_eq!(fs::read(new(plain)).unwrap(), b"abcdef");
    assert_ne!(inode(&new(misnamed)), inode(&old(misnamed)), "its name's size is not the recorded one: copied afresh");
    assert_eq!(j2["bytes_copied"].as_u64(), Some(6 + 5), "{j2}");
    for s in [&s1, &s2] {
        assert_verifies(s);
    }
}
