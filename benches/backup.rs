//! Backup speed and peak memory against `tar | tar`, `cp -a` and `rsync -a` on the same Maildir in
//! the same run, `--link` against `cp -al`, lock hold times, snapshots when nothing changed and
//! after 10 % flag changes and 1 % new mail against `rsync -a --link-dest` and `doveadm backup`
//! (run without a Dovecot server, from a config file; when a `vmail` user exists), the bytes each
//! snapshot writes, and what hand-offs to restic and borg read and add when little changed.
//!
//! `cargo bench --bench backup` (sizes: `-- --messages 20000,100000`, repeats: `--runs 3`;
//! `--ours-only` skips the peers, e.g. for the memory of `--messages 1000000`).
//! The Maildir is synthetic but shaped like Dovecot's: 5 folders, Dovecot file names,
//! sizes 1-12 KiB, a dovecot-uidlist per folder. Everything runs warm (page cache), as a
//! nightly backup of a busy server mostly does; the median of the runs is reported.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_maildir-backup");
const FOLDERS: [&str; 5] = ["", ".Sent", ".Archive", ".Lists.Rust", ".Trash"];

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

/// A deterministic pseudo-random stream (no extra crates for a benchmark).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn make_maildir(root: &Path, messages: usize) -> Vec<PathBuf> {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut files = Vec::with_capacity(messages);
    let body: Vec<u8> = (0..16384u32).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789 \n"[(i % 38) as usize]).collect();
    for f in FOLDERS {
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(root.join(f).join(sub)).unwrap();
        }
        if !f.is_empty() {
            fs::write(root.join(f).join("maildirfolder"), b"").unwrap();
        }
    }
    let mut uidlists: Vec<String> = FOLDERS.iter().map(|_| "3 V1700000000 N1 G0123456789abcdef0123456789abcdef\n".to_string()).collect();
    for i in 0..messages {
        let k = i % FOLDERS.len();
        let size = 1024 + (rng.next() % 11264) as usize;
        let unique = format!("{}.M{}P{}.bench,S={size},W={}", 1_700_000_000 + i, i, 4242, size + size / 40);
        let name = format!("{unique}:2,{}", if i % 3 == 0 { "" } else { "S" });
        let path = root.join(FOLDERS[k]).join("cur").join(&name);
        let mut data = format!("Message-ID: <{i}@bench>\r\nSubject: message {i}\r\n\r\n").into_bytes();
        data.extend_from_slice(&body[..size.saturating_sub(data.len())]);
        fs::write(&path, &data).unwrap();
        uidlists[k].push_str(&format!("{} :{unique}\n", i / FOLDERS.len() + 1));
        files.push(path);
    }
    for (k, f) in FOLDERS.iter().enumerate() {
        fs::write(root.join(f).join("dovecot-uidlist"), &uidlists[k]).unwrap();
    }
    files
}

fn run(cmd: &mut Command) -> Duration {
    measure(cmd).time
}

/// A finished benchmark command: its wall time, its peak RSS (of it or of any process it waited
/// for), and its standard output.
struct Measured {
    time: Duration,
    rss_kib: u64,
    stdout: String,
}

/// Runs `cmd` under GNU time for its peak RSS: a child we spawn ourselves starts out sharing our
/// memory until it execs, which `wait4` would count as its own.
fn measure(cmd: &mut Command) -> Measured {
    let rss_file = tempfile::NamedTempFile::new().expect("temp file");
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-f").arg("%M").arg("-o").arg(rss_file.path()).arg(cmd.get_program()).args(cmd.get_args());
    timed.envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    let t = Instant::now();
    let out = timed.output().expect("run benchmark command under /usr/bin/time");
    let time = t.elapsed();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let rss_kib = fs::read_to_string(rss_file.path()).unwrap_or_default().trim().parse().unwrap_or(0);
    Measured { time, rss_kib, stdout: String::from_utf8_lossy(&out.stdout).into_owned() }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn json_field(json: &str, field: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json).expect("json report");
    v[field].as_f64().unwrap_or(f64::NAN)
}

/// Files and bytes newly written for the backup or snapshot `dir`: regular files with a single
/// link below it (a snapshot's folders' `cur` and `new` links into its series' store followed,
/// but for the entries `previous`, the snapshot before it, links to as well), and the message
/// records of each store entry it links to that `previous` does not.
fn new_bytes(dir: &Path, previous: Option<&Path>) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    let old_entries: HashSet<PathBuf> = previous.map(store_entries).unwrap_or_default();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let linked = is_store_link(&e.path());
            // A directory shared with the previous snapshot holds nothing new.
            if linked && old_entries.contains(fs::canonicalize(e.path()).unwrap().parent().unwrap()) {
                continue;
            }
            let md = if linked { fs::metadata(e.path()) } else { e.metadata() }.unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && md.nlink() == 1 {
                files += 1;
                bytes += md.len();
            }
        }
    }
    for entry in store_entries(dir).difference(&old_entries) {
        let md = fs::metadata(entry.join("messages")).unwrap();
        files += 1;
        bytes += md.len();
    }
    (files, bytes)
}

/// A snapshot's folder's `cur` or `new`, linked into its series' store.
fn is_store_link(p: &Path) -> bool {
    matches!(p.file_name().and_then(|n| n.to_str()), Some("cur") | Some("new")) && fs::read_link(p).is_ok_and(|t| t.to_string_lossy().contains("/.store/"))
}

/// The store entries a snapshot's folders link to.
fn store_entries(snapshot: &Path) -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    let mut stack = vec![snapshot.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if is_store_link(&p) {
                out.insert(fs::canonicalize(&p).unwrap().parent().unwrap().to_path_buf());
            } else if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn has(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn main() {
    let sizes: Vec<usize> = arg("--messages").unwrap_or_else(|| "20000,100000".into()).split(',').filter_map(|s| s.parse().ok()).collect();
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let base = PathBuf::from(std::env::var("MB_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let ours_only = std::env::args().any(|a| a == "--ours-only");
    println!("maildir-backup benchmark ({} runs each, median; warm cache; {} cores)", runs, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    for &n in &sizes {
        let work = tempfile::Builder::new().prefix("mb-bench.").tempdir_in(&base).expect("bench dir");
        let src = work.path().join("Maildir");
        let t = Instant::now();
        let files = make_maildir(&src, n);
        let total: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
        println!("\n== {n} messages, {:.1} MiB (generated in {:.1} s)", total as f64 / 1048576.0, t.elapsed().as_secs_f64());

        let mut times: Vec<(&str, Duration, u64)> = Vec::new();
        let mut holds = Vec::new();
        // cp and rsync get a `sync -f` (syncfs) afterwards: maildir-backup makes its copy
        // durable before publishing it, so the fair comparison includes the flush.
        let synced = |cmd: String, d: &Path| {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("{cmd} && sync -f '{}'", d.display()));
            c
        };
        let tools: Vec<(&str, Box<dyn Fn(&Path) -> Command>)> = vec![
            ("tar | tar", Box::new(|d: &Path| synced(format!("mkdir '{1}' && tar -C '{0}' -cf - . | tar -C '{1}' -xpf -", src.display(), d.display()), d))),
            ("cp -a", Box::new(|d: &Path| synced(format!("cp -a '{}' '{}'", src.display(), d.display()), d))),
            ("rsync -a", Box::new(|d: &Path| synced(format!("rsync -a '{}/' '{}'", src.display(), d.display()), d))),
            ("maildir-backup", Box::new(|d: &Path| { let mut c = Command::new(BIN); c.args(["backup", "--json"]).arg(&src).arg(d); c })),
            // Hard-link snapshots, and their unlocked peer.
            ("cp -al", Box::new(|d: &Path| synced(format!("cp -al '{}' '{}'", src.display(), d.display()), d))),
            ("maildir-backup --link", Box::new(|d: &Path| { let mut c = Command::new(BIN); c.args(["backup", "--json", "--link"]).arg(&src).arg(d); c })),
        ];
        let skip = |name: &str| (!name.starts_with("maildir-backup") && ours_only) || (name.starts_with("rsync") && !has("rsync"));
        let mut measured: Vec<(Vec<Duration>, u64)> = vec![(Vec::new(), 0); tools.len()];
        // Round by round, each round in another order: the disk's writeback slows whatever
        // runs after a big copy, so no tool is always the one after another's.
        for r in 0..runs {
            let mut order: Vec<usize> = (0..tools.len()).filter(|&i| !skip(tools[i].0)).collect();
            let turn = r % order.len().max(1);
            order.rotate_left(turn);
            for i in order {
                let (name, mk) = &tools[i];
                let dest = work.path().join(format!("out-{}-{r}", name.replace([' ', '|'], "")));
                let m = measure(&mut mk(&dest));
                if name.starts_with("maildir-backup") {
                    holds.push((*name, json_field(&m.stdout, "lock_hold_ms")));
                }
                measured[i].0.push(m.time);
                measured[i].1 = measured[i].1.max(m.rss_kib);
                let _ = fs::remove_dir_all(&dest);
            }
        }
        for ((name, _), (v, rss)) in tools.iter().zip(measured) {
            if !v.is_empty() {
                times.push((name, median(v), rss));
            }
        }
        let time_of = |tool: &str| times.iter().find(|(n, ..)| *n == tool).map(|t| t.1).unwrap();
        let (ours, linked) = (time_of("maildir-backup"), time_of("maildir-backup --link"));
        for (name, t, rss) in &times {
            let mine = if name.contains("-al") || name.contains("--link") { linked } else { ours };
            println!("  {name:<22} {:>8.2} s (incl. sync), peak RSS {:>7.1} MiB   ours/{name}: {:.2}", t.as_secs_f64(), mib(*rss), mine.as_secs_f64() / t.as_secs_f64());
        }
        println!("  --link / copy: {:.3}", linked.as_secs_f64() / ours.as_secs_f64());
        for tool in ["maildir-backup", "maildir-backup --link"] {
            let mut h: Vec<f64> = holds.iter().filter(|(n, _)| *n == tool).map(|(_, ms)| *ms).collect();
            h.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!("  lock hold of {tool} (quiescent source): median {:.2} ms, max {:.2} ms", h[h.len() / 2], h[h.len() - 1]);
        }

        // Lock hold while the source changes: once the copy is under way, 1 % of the messages
        // get a flag (renamed) and 0.1 % new ones arrive; then the source is put back.
        let dest = work.path().join("out-churn");
        let staging = work.path().join(".out-churn.maildir-backup-staging");
        let child = Command::new(BIN).args(["backup", "--json"]).arg(&src).arg(&dest).stdout(std::process::Stdio::piped()).spawn().unwrap();
        while !staging.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut renamed = Vec::new();
        for f in files.iter().step_by(100) {
            let to = PathBuf::from(format!("{}F", f.display()));
            if fs::rename(f, &to).is_ok() {
                renamed.push((to, f.clone()));
            }
        }
        let new_mail: Vec<PathBuf> = (0..n / 1000).map(|i| src.join("new").join(format!("{}.M{i}P777.bench,S=1500", 1_900_000_000 + i))).collect();
        for p in &new_mail {
            fs::write(p, vec![b'y'; 1500]).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j = String::from_utf8_lossy(&out.stdout);
        println!(
            "  lock hold with {} renames + {} new messages during the copy: {:.2} ms ({} changes caught up)",
            renamed.len(),
            new_mail.len(),
            json_field(&j, "lock_hold_ms"),
            json_field(&j, "changed_during_backup")
        );
        for (to, from) in renamed {
            fs::rename(to, from).unwrap();
        }
        for p in new_mail {
            fs::remove_file(p).unwrap();
        }
        let _ = fs::remove_dir_all(&dest);

        snapshots(work.path(), &src, &files, n, ours_only);

        if ours_only {
        } else if has("restic") && has("borg") {
            offsite(work.path(), &src, n);
        } else {
            println!("  (offsite figures skipped: restic or borg is not installed)");
        }
    }
}

/// Snapshots into a repository, first when nothing changed and then after 10 % flag changes and
/// 1 % new mail, each against its peers on their own previous copies: `rsync -a --link-dest` and
/// `doveadm backup` (the latter only where a `vmail` user can own the mail it reads). Time, bytes
/// newly written (files with one link), peak RSS.
fn snapshots(work: &Path, src: &Path, files: &[PathBuf], n: usize, ours_only: bool) {
    let repo = work.join("repo");
    let rs = work.join("rsync");
    fs::create_dir_all(&rs).unwrap();
    let ours = || measure(Command::new(BIN).args(["backup", "-q", "--repo"]).arg(&repo).args(["--name", "u"]).arg(src));
    let rsync_to = |from: &str, to: &str| measure(Command::new("rsync").arg("-a").arg(format!("--link-dest={}", rs.join(from).display())).arg(format!("{}/", src.display())).arg(rs.join(to)));
    let doveadm = (!ours_only).then(|| Doveadm::new(work, src)).flatten();
    // As on a quiet night: the last change (the lock hold runs above) over a second before the
    // first snapshot lists the folders, so the next may take unchanged ones over.
    std::thread::sleep(Duration::from_millis(1100));
    // Each first copy starts with nothing of the steps before left to write back (on ext4 an
    // fsync waits for all of it).
    let settle = || run(Command::new("sync").arg("-f").arg(work));
    settle();
    let first = ours();
    if !ours_only {
        run(Command::new("rsync").arg("-a").arg(format!("{}/", src.display())).arg(rs.join("0")));
    }
    settle();
    let dv_first = doveadm.as_ref().map(Doveadm::backup);
    println!("  first snapshot: maildir-backup --repo {:.2} s, peak RSS {:.1} MiB{}", first.time.as_secs_f64(), mib(first.rss_kib), dv_first.as_ref().map_or(String::new(), |m| format!("; doveadm backup {:.2} s, {:.1} MiB", m.time.as_secs_f64(), mib(m.rss_kib))));
    std::thread::sleep(Duration::from_millis(1100)); // the next snapshot's name
    let before = latest(&repo);
    let same = [("maildir-backup --repo", Some(ours())), ("rsync -a --link-dest", (!ours_only).then(|| rsync_to("0", "same"))), ("doveadm backup", doveadm.as_ref().map(Doveadm::backup))];
    print_snapshot_rows("when nothing changed", &same, &new_bytes(&latest(&repo), Some(&before)), None);

    let mut flagged = 0;
    // Every ninth message: spread over all folders (every tenth would all be in one).
    for f in files.iter().step_by(9) {
        let s = f.to_string_lossy();
        let to = if s.ends_with(":2,") { format!("{s}S") } else { format!("{s}F") };
        fs::rename(f, &to).unwrap();
        flagged += 1;
    }
    // New mail in INBOX, then each tool's snapshot of the change (rsync into `to`, linking
    // from `from`), over a second later so that the next may take unchanged folders over.
    let after_change = |label: String, pid: u32, from: &str, to: &str| {
        let mut new_mail = 0;
        for i in 0..n / 100 {
            fs::write(src.join("new").join(format!("{}.M{i}P{pid}.bench,S=2000", 1_800_000_000 + i)), vec![b'x'; 2000]).unwrap();
            new_mail += 2000;
        }
        std::thread::sleep(Duration::from_millis(1100));
        let before = latest(&repo);
        let rows = [("maildir-backup --repo", Some(ours())), ("rsync -a --link-dest", (!ours_only).then(|| rsync_to(from, to))), ("doveadm backup", doveadm.as_ref().map(Doveadm::backup))];
        let rsync_written = (!ours_only).then(|| new_bytes(&rs.join(to), None).1);
        print_snapshot_rows(&format!("after {label} + {} new messages", n / 100), &rows, &new_bytes(&latest(&repo), Some(&before)), Some((new_mail, rsync_written)));
        rows
    };
    let changed = after_change(format!("{flagged} flag changes (in every folder)"), 999, "0", "1");
    if let Some(rsync) = &changed[1].1 {
        // A snapshot that is a complete Maildir of hard links (rsync --link-dest's too) makes one
        // link per message of each folder that changed: cp -al makes just that tree.
        let floor = measure(Command::new("cp").arg("-al").arg(src).arg(work.join("floor")));
        let t = floor.time.as_secs_f64();
        let dv = changed[2].1.as_ref().map_or(String::new(), |d| format!(", {:.2} × doveadm backup", t / d.time.as_secs_f64()));
        println!("    {:<22} {t:>8.2} s: only the links of such a tree, {:.2} × rsync --link-dest{dv}", "(cp -al of the source)", t / rsync.time.as_secs_f64());
        fs::remove_dir_all(work.join("floor")).unwrap();
    }

    // The same changes in INBOX alone, as on a usual night: the other folders are taken over.
    let mut inbox: Vec<PathBuf> = fs::read_dir(src.join("cur")).unwrap().map(|e| e.unwrap().path()).collect();
    inbox.sort();
    let mut flagged = 0;
    for f in inbox.iter().step_by(9) {
        fs::rename(f, format!("{}T", f.display())).unwrap();
        flagged += 1;
    }
    after_change(format!("{flagged} flag changes in INBOX only"), 998, "1", "2");
}

fn latest(repo: &Path) -> PathBuf {
    fs::canonicalize(repo.join("u").join("latest")).unwrap()
}

/// One snapshot situation: each tool's time and memory, and ours against the peers.
fn print_snapshot_rows(label: &str, rows: &[(&str, Option<Measured>)], (files, written): &(u64, u64), mail: Option<(u64, Option<u64>)>) {
    println!("  snapshot {label}:");
    let ours = rows[0].1.as_ref().unwrap().time.as_secs_f64();
    for (name, m) in rows {
        let Some(m) = m else { continue };
        println!("    {name:<22} {:>8.2} s, peak RSS {:>7.1} MiB   ours/{name}: {:.2}", m.time.as_secs_f64(), mib(m.rss_kib), ours / m.time.as_secs_f64());
    }
    print!("    maildir-backup wrote {files} new files, {:.2} MiB", *written as f64 / 1048576.0);
    if let Some((mail, rsync)) = mail {
        print!(" ({:.2} × the new mail's {:.2} MiB", *written as f64 / mail as f64, mail as f64 / 1048576.0);
        if let Some(r) = rsync {
            print!("; rsync --link-dest wrote {:.2} MiB", r as f64 / 1048576.0);
        }
        print!(")");
    }
    println!();
}

/// `doveadm backup` of the bench Maildir, without a Dovecot server: a config of its own, the mail
/// read as `vmail` (Dovecot will not read mail as root), into a target of its own.
struct Doveadm {
    conf: PathBuf,
    target: PathBuf,
}

impl Doveadm {
    fn new(work: &Path, src: &Path) -> Option<Doveadm> {
        if !has("doveadm") {
            return None;
        }
        let dir = work.join("doveadm");
        for d in ["run", "state", "target"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let ok = Command::new("chown").args(["-R", "vmail:vmail"]).arg(src).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            println!("  (doveadm backup skipped: no vmail user to read the mail as)");
            return None;
        }
        let conf = dir.join("dovecot.conf");
        fs::write(
            &conf,
            format!(
                "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/log\ninstance_name = mb-bench\nprotocols =\nssl = no\n\
                 mail_uid = vmail\nmail_gid = vmail\nfirst_valid_uid = 1\nmail_location = maildir:{src}\n",
                d = dir.display(),
                src = src.display()
            ),
        )
        .unwrap();
        Some(Doveadm { conf, target: dir.join("target/b") })
    }

    /// One `doveadm backup` (the first is a full one; later ones bring the target up to date).
    fn backup(&self) -> Measured {
        let mut c = Command::new("doveadm");
        c.arg("-c").arg(&self.conf).arg("backup").arg(format!("maildir:{}", self.target.display())).env("USER", "u");
        measure(&mut c)
    }
}

/// Hand-offs to restic and borg (local repositories): each tool's first, then one after 10 % flag
/// changes and 1 % new mail of random text; what the second read again and added to the repository.
fn offsite(work: &Path, src: &Path, n: usize) {
    let stage = work.join("stage/u");
    let tools: [(&str, Vec<String>); 2] = [
        ("restic", vec!["restic".into(), "-q".into(), "--json".into(), "-r".into(), work.join("restic").display().to_string(), "backup".into(), "--ignore-ctime".into(), ".".into()]),
        ("borg", vec!["borg".into(), "create".into(), "--json".into(), "--list".into(), "--files-cache=mtime,size,inode".into(), format!("{}::{{now:%Y-%m-%dT%H:%M:%S.%f}}", work.join("borg").display()), ".".into()]),
    ];
    let env = [("RESTIC_PASSWORD", "bench"), ("BORG_PASSPHRASE", "bench"), ("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")];
    assert!(Command::new("restic").args(["init", "-q", "-r"]).arg(work.join("restic")).envs(env).status().unwrap().success());
    let borg_init = Command::new("borg").args(["init", "-e", "repokey"]).arg(work.join("borg")).envs(env).output().unwrap();
    assert!(borg_init.status.success(), "{}", String::from_utf8_lossy(&borg_init.stderr));
    let hand_off = |cmd: &[String]| {
        let t = Instant::now();
        let out = Command::new(BIN).args(["hand-off", "-q"]).arg(src).arg("--stage").arg(&stage).arg("--").args(cmd).envs(env).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (t.elapsed(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let firsts: Vec<Duration> = tools.iter().map(|(_, cmd)| hand_off(cmd).0).collect();

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut renamed = 0;
    for dir in FOLDERS.iter().map(|f| src.join(f).join("cur")) {
        let mut names: Vec<PathBuf> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for f in names.iter().step_by(10) {
            fs::rename(f, format!("{}T", f.display())).unwrap();
            renamed += 1;
        }
    }
    let mut new_bytes = 0u64;
    for i in 0..n / 100 {
        let size = 1024 + (rng.next() % 11264) as usize;
        let body: Vec<u8> = (0..size).map(|_| b'a' + (rng.next() % 26) as u8).collect();
        fs::write(src.join("new").join(format!("{}.M{i}P4343.bench,S={size}", 1_900_000_000 + i)), &body).unwrap();
        new_bytes += size as u64;
    }
    println!("  offsite hand-offs (local repositories), then again after {renamed} flag changes + {} new messages ({:.1} MiB of random text):", n / 100, new_bytes as f64 / 1048576.0);
    for ((name, cmd), first) in tools.iter().zip(firsts) {
        let (t, stdout, stderr) = hand_off(cmd);
        let (read, added) = if *name == "restic" {
            let s: serde_json::Value = stdout.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v.get("data_added").is_some())).unwrap();
            (s["files_new"].as_u64().unwrap() + s["files_changed"].as_u64().unwrap(), s["data_added"].as_u64().unwrap())
        } else {
            let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            (stderr.lines().filter(|l| l.starts_with("A ") || l.starts_with("M ")).count() as u64, s["archive"]["stats"]["deduplicated_size"].as_u64().unwrap())
        };
        println!(
            "    {name:<7} first {:>7.2} s; second {:>7.2} s, read {read} files again, added {:>7.1} MiB ({:.2} × the new mail)",
            first.as_secs_f64(),
            t.as_secs_f64(),
            added as f64 / 1048576.0,
            added as f64 / new_bytes as f64
        );
    }
}
