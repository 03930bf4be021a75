//! Live mail churn against a test [`Dovecot`](super::Dovecot), and helpers to inspect a backed-up Maildir.
//!
//! - [`Churn`]: worker threads, each with its own real IMAP session (flag changes with `UID STORE` followed by
//!   `NOOP` so Dovecot renames the files, `UID MOVE` between folders, `APPEND`, `UID EXPUNGE`), plus an optional
//!   `dovecot-lda` delivery thread. Can be paused (every worker parked between two operations) and stopped.
//! - [`Tracker`]: a logical clock and, per Message-ID, when the message was known to exist and when an expunge
//!   of it was first attempted, so a test can compute which messages must be in a backup taken between two
//!   ticks: [`Tracker::required`].
//! - Inspection: [`message_id_of`], [`scan_message_ids`], [`files_under_tmp`], [`expected_uid_flags`],
//!   [`maildir_flags_to_imap`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::dovecot::{Instance, Release, LDA_BIN, PASSWORD};
use super::dovecot_common::{message, normalize_flags};
use super::imap::Imap;
use super::run::Run;

// ---------------------------------------------------------------------------------------------------------
// A tiny PRNG (no rand crate in the dev-dependencies)

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng((seed ^ t ^ 0x9E37_79B9_7F4A_7C15).max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tracking which messages exist

#[derive(Default)]
struct TrackInner {
    /// Message-ID → tick at which the message was known to exist (after its APPEND/delivery completed).
    created: HashMap<String, u64>,
    /// Message-ID → tick just before the first expunge of it was sent.
    expunged: HashMap<String, u64>,
    /// Message-ID → (tick before, tick after) of every UID MOVE of it.
    moved: HashMap<String, Vec<(u64, u64)>>,
}

/// Logical clock + per-message history. All ticks come from one counter, so "before the backup started" is
/// `tick < start` where `start` was taken just before the backup was launched.
#[derive(Default)]
pub struct Tracker {
    clock: AtomicU64,
    inner: Mutex<TrackInner>,
}

impl Tracker {
    pub fn new() -> Arc<Tracker> {
        Arc::new(Tracker { clock: AtomicU64::new(1), inner: Mutex::default() })
    }

    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Call after the message is known to be stored.
    pub fn created(&self, mid: &str) {
        let t = self.tick();
        self.inner.lock().unwrap().created.entry(mid.to_string()).or_insert(t);
    }

    /// Call before sending the expunge.
    pub fn expunging(&self, mid: &str) {
        let t = self.tick();
        self.inner.lock().unwrap().expunged.entry(mid.to_string()).or_insert(t);
    }

    pub fn moved(&self, mid: &str, before: u64, after: u64) {
        self.inner.lock().unwrap().moved.entry(mid.to_string()).or_default().push((before, after));
    }

    /// Registers every message currently in the Maildir at `root` as existing (tick of now).
    pub fn register_existing(&self, root: &Path) -> usize {
        let ids = scan_message_ids(root);
        for mid in ids.keys() {
            self.created(mid);
        }
        ids.len()
    }

    /// Messages that existed before `start` and whose expunge was not attempted before `end`: a backup run
    /// between the ticks `start` and `end` must hold each of them exactly once.
    pub fn required(&self, start: u64, end: u64) -> HashSet<String> {
        let g = self.inner.lock().unwrap();
        g.created
            .iter()
            .filter(|(mid, &c)| c < start && g.expunged.get(*mid).map_or(true, |&x| x > end))
            .map(|(m, _)| m.clone())
            .collect()
    }

    pub fn is_known(&self, mid: &str) -> bool {
        self.inner.lock().unwrap().created.contains_key(mid)
    }

    /// Was a UID MOVE of `mid` in flight at some moment between the ticks `start` and `end`?
    pub fn moved_between(&self, mid: &str, start: u64, end: u64) -> bool {
        let g = self.inner.lock().unwrap();
        g.moved.get(mid).is_some_and(|v| v.iter().any(|&(b, a)| a > start && b < end))
    }

    /// Were two UID MOVEs of `mid` (from different sessions) in flight at the same time? Both may then have
    /// copied it before either expunged it: Dovecot itself ends up with the message in two folders.
    pub fn moved_concurrently(&self, mid: &str) -> bool {
        let g = self.inner.lock().unwrap();
        let Some(v) = g.moved.get(mid) else { return false };
        v.iter().enumerate().any(|(i, &(b1, a1))| v.iter().skip(i + 1).any(|&(b2, a2)| b1 < a2 && b2 < a1))
    }

    /// The (before, after) ticks of every UID MOVE of `mid`.
    pub fn moves_of(&self, mid: &str) -> Vec<(u64, u64)> {
        self.inner.lock().unwrap().moved.get(mid).cloned().unwrap_or_default()
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        let g = self.inner.lock().unwrap();
        (g.created.len(), g.expunged.len(), g.moved.values().map(Vec::len).sum())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Watching a backup's lock

/// Watches (inotify) `dir/dovecot-uidlist.lock` and records, as [`Tracker`] ticks, when a lock whose content
/// names the pid given to [`LockWatch::set_pid`] was created and removed: the window in which that process
/// held the folder's uidlist lock. (A backup locks INBOX, the first control dir in sort order, first and
/// releases it first, so INBOX's window is the backup's reconcile window, seen a little late.)
pub struct LockWatch {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    handle: Option<JoinHandle<Vec<(u64, u64)>>>,
}

impl LockWatch {
    pub fn start(dir: &Path, tracker: Arc<Tracker>) -> LockWatch {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::os::fd::AsFd;

        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(0));
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify_init");
        ino.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_TO).expect("inotify_add_watch");
        let lock = dir.join("dovecot-uidlist.lock");
        let (st, p) = (stop.clone(), pid.clone());
        let handle = std::thread::spawn(move || {
            let mut pairs = Vec::new();
            let mut pending: Option<u64> = None;
            let mut ours_next = false;
            loop {
                let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(20u16));
                let events = ino.read_events().unwrap_or_default();
                for ev in events {
                    let t = tracker.tick();
                    let want = p.load(Ordering::SeqCst);
                    let name = ev.name.as_deref().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    // link() mode: the process first creates `.temp.<host>.<pid>.<random>` (its name
                    // tells whose it is even if we look too late to read the lock itself), then links it.
                    if want != 0 && name.starts_with(".temp.") && name.contains(&format!(".{want}.")) && ev.mask.contains(AddWatchFlags::IN_CREATE) {
                        ours_next = true;
                        continue;
                    }
                    if name != "dovecot-uidlist.lock" {
                        continue;
                    }
                    if ev.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                        let content = fs::read_to_string(&lock).unwrap_or_default();
                        if std::mem::take(&mut ours_next) || (want != 0 && content.starts_with(&format!("{want}:"))) {
                            pending = Some(t);
                        }
                    } else if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                        if let Some(a) = pending.take() {
                            pairs.push((a, tracker.tick()));
                        }
                    }
                }
                if st.load(Ordering::SeqCst) {
                    return pairs;
                }
            }
        });
        LockWatch { stop, pid, handle: Some(handle) }
    }

    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::SeqCst);
    }

    /// Stops watching; returns every (created, removed) window of the watched pid's locks.
    pub fn finish(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map(|h| h.join().expect("lock watcher panicked")).unwrap_or_default()
    }
}

impl Drop for LockWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Churn

#[derive(Clone, Debug)]
pub struct ChurnOptions {
    pub port: u16,
    /// D/dovecot.conf (for dovecot-lda).
    pub conf: PathBuf,
    pub user: String,
    /// IMAP mailbox names (UTF-8) the workers operate on.
    pub folders: Vec<String>,
    pub imap_workers: usize,
    /// Run a dovecot-lda delivery thread.
    pub lda: bool,
    /// Pause between two operations of one worker.
    pub pace: Duration,
    /// Pause between two LDA deliveries.
    pub lda_pace: Duration,
    /// Run a thread that creates a folder, fills it, renames it (twice) and deletes it, over and over.
    pub folder_worker: bool,
}

#[derive(Debug, Default, Clone)]
pub struct ChurnStats {
    /// Folders created, renamed and deleted by the folder worker.
    pub folder_ops: u64,
    pub folder_renames: u64,
    pub flag_changes: u64,
    pub moves: u64,
    pub appends: u64,
    pub expunges: u64,
    pub deliveries: u64,
    pub errors: Vec<String>,
}

impl ChurnStats {
    fn add(&mut self, o: ChurnStats) {
        self.folder_ops += o.folder_ops;
        self.folder_renames += o.folder_renames;
        self.flag_changes += o.flag_changes;
        self.moves += o.moves;
        self.appends += o.appends;
        self.expunges += o.expunges;
        self.deliveries += o.deliveries;
        self.errors.extend(o.errors);
    }
    pub fn total_ops(&self) -> u64 {
        self.folder_renames + self.flag_changes + self.moves + self.appends + self.expunges + self.deliveries
    }
}

struct Shared {
    stop: AtomicBool,
    pause: AtomicBool,
    parked: AtomicUsize,
    ops: AtomicU64,
}

impl Shared {
    /// If the churn is paused: counts this worker as parked until it is resumed or stopped, and returns
    /// true (the caller then looks at `stop` again). False, at once, if not paused.
    fn park_while_paused(&self) -> bool {
        if !self.pause.load(Ordering::SeqCst) {
            return false;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
        true
    }
}

/// Running churn. Stop it with [`Churn::stop`] (also done, ignoring results, on drop).
pub struct Churn {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<ChurnStats>>,
}

const FLAGS: &[&str] = &["\\Seen", "\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted", "$Work", "$Later"];

/// `UID FETCH uid (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])` → the Message-ID (with angle brackets).
pub fn imap_message_id(imap: &mut Imap, uid: u32) -> Option<String> {
    let lines = imap.command(&format!("UID FETCH {uid} (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")).ok()?;
    let uid_tok = format!("UID {uid}");
    lines.iter().filter(|l| l.contains(&uid_tok)).find_map(|l| message_id_in(l.as_bytes()))
}

/// The first `Message-ID:` header value in `text` (case-insensitive header name).
pub fn message_id_in(text: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(text);
    for line in s.split(['\n', '\r']) {
        if line.get(..11).is_some_and(|h| h.eq_ignore_ascii_case("message-id:")) {
            let v = line[11..].trim();
            if !v.is_empty() {
                return Some(v.to_string());
            }
        }
    }
    None
}

fn imap_worker(id: usize, o: ChurnOptions, sh: Arc<Shared>, tr: Arc<Tracker>) -> ChurnStats {
    let mut st = ChurnStats::default();
    let mut rng = Rng::new(id as u64 * 7919 + 17);
    let mut imap = Imap::connect(o.port);
    imap.login(&o.user, PASSWORD);
    let err = |st: &mut ChurnStats, what: &str, e: String| {
        if st.errors.len() < 50 {
            st.errors.push(format!("worker {id}: {what}: {e}"));
        }
    };
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.park_while_paused() {
            continue;
        }
        let folder = rng.pick(&o.folders).clone();
        let op = rng.below(100);
        if op < 15 {
            // APPEND a new message.
            let n = rng.below(1_000_000);
            let msg = message(n, 400 + rng.below(2500));
            let mid = message_id_in(&msg).expect("generated message has a Message-ID");
            let flags = if rng.below(2) == 0 { "\\Seen" } else { "" };
            match imap.append(&folder, flags, &msg) {
                Ok(()) => {
                    tr.created(&mid);
                    st.appends += 1;
                }
                Err(e) => err(&mut st, "APPEND", e),
            }
        } else {
            if let Err(e) = imap.select(&folder) {
                err(&mut st, "SELECT", e);
                continue;
            }
            let uids = match imap.uid_search_all() {
                Ok(u) => u,
                Err(e) => {
                    err(&mut st, "SEARCH", e);
                    continue;
                }
            };
            if uids.is_empty() {
                continue;
            }
            let uid = *rng.pick(&uids);
            if op < 70 {
                // Flag change, then NOOP: Dovecot renames the file during that sync.
                let flag = *rng.pick(FLAGS);
                let how = if rng.below(3) == 0 { "-FLAGS" } else { "+FLAGS" };
                match imap.uid_store(&uid.to_string(), how, flag) {
                    Ok(()) => st.flag_changes += 1,
                    Err(e) => err(&mut st, "STORE", e),
                }
                if let Err(e) = imap.noop() {
                    err(&mut st, "NOOP", e);
                }
            } else if op < 88 {
                let others: Vec<&String> = o.folders.iter().filter(|f| **f != folder).collect();
                let dest = (*rng.pick(&others)).clone();
                let mid = imap_message_id(&mut imap, uid);
                let before = tr.tick();
                match imap.uid_move(&uid.to_string(), &dest) {
                    Ok(()) => st.moves += 1,
                    // Another worker expunged it first: a race between clients, not an error.
                    Err(e) if e.contains("[EXPUNGEISSUED]") => continue,
                    Err(e) => err(&mut st, "MOVE", e),
                }
                let after = tr.tick();
                if let Some(mid) = mid {
                    tr.moved(&mid, before, after);
                }
            } else {
                let Some(mid) = imap_message_id(&mut imap, uid) else { continue };
                tr.expunging(&mid);
                match imap.uid_expunge(&uid.to_string()) {
                    Ok(()) => st.expunges += 1,
                    Err(e) => err(&mut st, "EXPUNGE", e),
                }
            }
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
        if !o.pace.is_zero() {
            std::thread::sleep(o.pace);
        }
    }
    imap.logout();
    st
}

/// CREATE a folder, APPEND a few messages, RENAME it twice (Dovecot renames the directory, with no uidlist
/// lock), then DELETE it (its messages count as expunged from just before the DELETE).
fn folder_worker(o: ChurnOptions, sh: Arc<Shared>, tr: Arc<Tracker>) -> ChurnStats {
    let mut st = ChurnStats::default();
    let mut rng = Rng::new(777);
    let mut imap = Imap::connect(o.port);
    imap.login(&o.user, PASSWORD);
    let mut n = 0u32;
    let err = |st: &mut ChurnStats, what: &str, e: String| {
        if st.errors.len() < 50 {
            st.errors.push(format!("folder worker: {what}: {e}"));
        }
    };
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.park_while_paused() {
            continue;
        }
        n += 1;
        let names = [format!("Tmp{n}"), format!("Tmp{n}r"), format!("Tmp{n}rr")];
        if let Err(e) = imap.create(&names[0]) {
            err(&mut st, "CREATE", e);
            continue;
        }
        st.folder_ops += 1;
        let mut mids = Vec::new();
        for _ in 0..4 {
            let msg = message(3_000_000 + rng.below(1_000_000), 300 + rng.below(1500));
            let mid = message_id_in(&msg).unwrap();
            match imap.append(&names[0], "", &msg) {
                Ok(()) => {
                    tr.created(&mid);
                    mids.push(mid);
                    st.appends += 1;
                }
                Err(e) => err(&mut st, "APPEND", e),
            }
        }
        let mut cur = 0;
        for next in 1..3 {
            // Between operations, pause (a parked worker leaves the folder where it is).
            std::thread::sleep(o.pace * 10);
            if sh.stop.load(Ordering::SeqCst) {
                break;
            }
            match imap.command(&format!("RENAME {} {}", super::imap::imap_quote(&names[cur]), super::imap::imap_quote(&names[next]))) {
                Ok(_) => {
                    st.folder_renames += 1;
                    st.folder_ops += 1;
                    cur = next;
                }
                Err(e) => err(&mut st, "RENAME", e),
            }
        }
        std::thread::sleep(o.pace * 10);
        for m in &mids {
            tr.expunging(m);
        }
        match imap.command(&format!("DELETE {}", super::imap::imap_quote(&names[cur]))) {
            Ok(_) => st.folder_ops += 1,
            Err(e) => err(&mut st, "DELETE", e),
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
    }
    imap.logout();
    st
}

/// `dovecot-lda -c conf -d user -m folder < msg`; Err(stderr) on failure.
pub fn lda_deliver(conf: &Path, user: &str, folder: &str, msg: &[u8]) -> Result<(), String> {
    let mut child = Command::new(LDA_BIN)
        .arg("-c")
        .arg(conf)
        .args(["-d", user, "-m", folder])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {LDA_BIN}: {e}"))?;
    let w = child.stdin.take().unwrap().write_all(msg);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() && w.is_ok() {
        Ok(())
    } else {
        Err(format!("{} ({w:?}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

fn lda_worker(o: ChurnOptions, sh: Arc<Shared>, tr: Arc<Tracker>) -> ChurnStats {
    let mut st = ChurnStats::default();
    let mut rng = Rng::new(4242);
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.park_while_paused() {
            continue;
        }
        let folder = rng.pick(&o.folders).clone();
        let msg = message(2_000_000 + rng.below(1_000_000), 300 + rng.below(2000));
        let mid = message_id_in(&msg).unwrap();
        match lda_deliver(&o.conf, &o.user, &folder, &msg) {
            Ok(()) => {
                tr.created(&mid);
                st.deliveries += 1;
            }
            Err(e) => {
                if st.errors.len() < 50 {
                    st.errors.push(format!("lda: {e}"));
                }
            }
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(o.lda_pace);
    }
    st
}

impl Churn {
    pub fn start(o: ChurnOptions, tracker: Arc<Tracker>) -> Churn {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            ops: AtomicU64::new(0),
        });
        let mut handles = Vec::new();
        for id in 0..o.imap_workers {
            let (o, sh, tr) = (o.clone(), shared.clone(), tracker.clone());
            handles.push(std::thread::spawn(move || imap_worker(id, o, sh, tr)));
        }
        if o.lda {
            let (o, sh, tr) = (o.clone(), shared.clone(), tracker.clone());
            handles.push(std::thread::spawn(move || lda_worker(o, sh, tr)));
        }
        if o.folder_worker {
            let (o, sh, tr) = (o.clone(), shared.clone(), tracker.clone());
            handles.push(std::thread::spawn(move || folder_worker(o, sh, tr)));
        }
        Churn { shared, handles }
    }

    /// Operations completed so far (all workers).
    pub fn ops(&self) -> u64 {
        self.shared.ops.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more operations have completed (or `limit` passed).
    pub fn wait_ops(&self, n: u64, limit: Duration) {
        let target = self.ops() + n;
        let deadline = Instant::now() + limit;
        while self.ops() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Parks every worker between two operations; returns once all are parked.
    pub fn pause(&self) {
        self.shared.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.shared.parked.load(Ordering::SeqCst) < self.handles.len() {
            assert!(Instant::now() < deadline, "churn workers did not park within 60 s");
            assert!(!self.handles.iter().any(|h| h.is_finished()), "a churn worker died");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
    }

    /// Stops all workers and returns their combined stats; panics if a worker panicked.
    pub fn stop(mut self) -> ChurnStats {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut all = ChurnStats::default();
        for h in self.handles.drain(..) {
            all.add(h.join().expect("churn worker panicked"));
        }
        all
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Inspecting a Maildir (source, backup or naive copy)

/// The Message-ID header of a message file (headers only are read).
pub fn message_id_of(path: &Path) -> Option<String> {
    let f = fs::File::open(path).ok()?;
    let mut r = BufReader::new(f);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            return None; // end of header
        }
        if let Some(v) = message_id_in(l.as_bytes()) {
            return Some(v);
        }
    }
}

fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() || is_store_link(&e.path()) {
            walk_files(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}

/// A snapshot's `cur` or `new` link into its series' store (see `maildir_backup::store`): walked
/// as the directory it stands for.
pub fn is_store_link(p: &Path) -> bool {
    let named = matches!(p.file_name().and_then(|n| n.to_str()), Some("cur") | Some("new"));
    named && fs::read_link(p).is_ok_and(|t| t.to_string_lossy().contains("/.store/"))
}

/// Every file (not directory; symlinks included, not followed, but for a snapshot's links into
/// its store) under `root`.
pub fn all_files(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    walk_files(root, &mut v);
    v.sort();
    v
}

fn parent_name(p: &Path) -> Option<&str> {
    p.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str())
}

/// Message-ID → the message files (in any `cur/` or `new/` below `root`) that carry it.
pub fn scan_message_ids(root: &Path) -> HashMap<String, Vec<PathBuf>> {
    let mut m: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for f in all_files(root) {
        if matches!(parent_name(&f), Some("cur") | Some("new")) {
            if let Some(mid) = message_id_of(&f) {
                m.entry(mid).or_default().push(f);
            }
        }
    }
    m
}

/// Files in any `tmp/` directory below `root`.
pub fn files_under_tmp(root: &Path) -> Vec<PathBuf> {
    all_files(root).into_iter().filter(|f| parent_name(f) == Some("tmp")).collect()
}

/// `dovecot-keywords` of a folder: index → keyword.
pub fn read_keywords(folder_dir: &Path) -> BTreeMap<u32, String> {
    let mut m = BTreeMap::new();
    if let Ok(text) = fs::read_to_string(folder_dir.join("dovecot-keywords")) {
        for l in text.lines() {
            if let Some((i, k)) = l.split_once(' ') {
                if let Ok(i) = i.parse() {
                    m.insert(i, k.to_string());
                }
            }
        }
    }
    m
}

/// IMAP flags (normalized like `Dovecot::fetch_uid_flags`) for Maildir info letters
/// (S=\Seen R=\Answered F=\Flagged T=\Deleted D=\Draft, a-z = keywords by `dovecot-keywords` index).
pub fn maildir_flags_to_imap(letters: &str, keywords: &BTreeMap<u32, String>) -> String {
    let mut v: Vec<String> = Vec::new();
    for c in letters.chars() {
        match c {
            'S' => v.push("\\Seen".into()),
            'R' => v.push("\\Answered".into()),
            'F' => v.push("\\Flagged".into()),
            'T' => v.push("\\Deleted".into()),
            'D' => v.push("\\Draft".into()),
            'a'..='z' => {
                let idx = c as u32 - 'a' as u32;
                v.push(keywords.get(&idx).cloned().unwrap_or_else(|| format!("<unknown keyword {c}>")));
            }
            _ => {}
        }
    }
    normalize_flags(&v.join(" "))
}

/// What Dovecot must show for a backed-up folder, from the folder's own files only:
/// `(uid → flags for every dovecot-uidlist entry whose file exists, next_uid, sorted flags of message files
/// the uidlist does not list)` — the latter get new UIDs ≥ next_uid when Dovecot opens the folder. next_uid is
/// the larger of the header's `N` and the highest listed uid + 1 (records are appended without a new header).
pub fn expected_uid_flags(folder_dir: &Path) -> (BTreeMap<u32, String>, u32, Vec<String>) {
    let keywords = read_keywords(folder_dir);
    // unique name → flags letters
    let mut files: HashMap<String, String> = HashMap::new();
    for sub in ["cur", "new"] {
        if let Ok(rd) = fs::read_dir(folder_dir.join(sub)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let (unique, flags) = match name.split_once(':') {
                    Some((u, info)) => (u.to_string(), info.strip_prefix("2,").unwrap_or("").to_string()),
                    None => (name.clone(), String::new()),
                };
                files.insert(unique, flags);
            }
        }
    }
    let mut by_uid = BTreeMap::new();
    let mut next_uid = 1;
    if let Ok(text) = fs::read_to_string(folder_dir.join("dovecot-uidlist")) {
        let mut lines = text.lines();
        if let Some(h) = lines.next() {
            for f in h.split(' ') {
                if let Some(n) = f.strip_prefix('N') {
                    next_uid = n.parse().unwrap_or(1);
                }
            }
        }
        for l in lines {
            let Some((left, name)) = l.split_once(" :") else { continue };
            let Ok(uid) = left.split(' ').next().unwrap_or("").parse::<u32>() else { continue };
            // Dovecot appends new records without rewriting the header, so N can be behind.
            next_uid = next_uid.max(uid + 1);
            let unique = name.split(':').next().unwrap_or(name);
            if let Some(flags) = files.remove(unique) {
                by_uid.insert(uid, maildir_flags_to_imap(&flags, &keywords));
            }
        }
    }
    let mut rest: Vec<String> = files.values().map(|f| maildir_flags_to_imap(f, &keywords)).collect();
    rest.sort();
    (by_uid, next_uid, rest)
}

/// What [`expected_uid_flags`] returns.
pub type Expected = (BTreeMap<u32, String>, u32, Vec<String>);

/// Compares Dovecot's `(uid, flags)` listing of a folder with what [`expected_uid_flags`] said (take that
/// before Dovecot opens the folder: it writes to it); None if they agree, else a description.
pub fn compare_with_expected(expected: &Expected, dovecot: &[(u32, String)]) -> Option<String> {
    let (by_uid, next_uid, rest) = expected;
    let got_old: BTreeMap<u32, String> = dovecot.iter().filter(|(u, _)| u < next_uid).cloned().collect();
    let mut got_new: Vec<String> = dovecot.iter().filter(|(u, _)| u >= next_uid).map(|(_, f)| f.clone()).collect();
    got_new.sort();
    if &got_old == by_uid && &got_new == rest {
        return None;
    }
    let mut diff = Vec::new();
    for (u, f) in by_uid {
        match got_old.get(u) {
            None => diff.push(format!("uid {u} ({f}) in uidlist+files, Dovecot does not list it")),
            Some(g) if g != f => diff.push(format!("uid {u}: file says {f:?}, Dovecot says {g:?}")),
            _ => {}
        }
    }
    for (u, g) in &got_old {
        if !by_uid.contains_key(u) {
            diff.push(format!("uid {u} ({g}) listed by Dovecot, not in uidlist+files"));
        }
    }
    if &got_new != rest {
        diff.push(format!("new uids (>= {next_uid}): Dovecot {got_new:?}, unlisted files {rest:?}"));
    }
    diff.truncate(10);
    Some(diff.join("; "))
}

// ---------------------------------------------------------------------------------------------------------
// Checking a backup taken under churn

/// [`ChurnOptions`] for `alice` on `d`: `workers` IMAP sessions over `folders`, no dovecot-lda (the delivery
/// thread runs the host's 2.3 binary), no folder worker.
pub fn imap_churn<R: Release>(d: &Instance<R>, folders: &[&str], workers: usize) -> ChurnOptions {
    ChurnOptions {
        port: d.port(),
        conf: d.conf(),
        user: "alice".into(),
        folders: folders.iter().map(|f| f.to_string()).collect(),
        imap_workers: workers,
        lda: false,
        pace: Duration::from_millis(2),
        lda_pace: Duration::from_millis(30),
        folder_worker: false,
    }
}

/// Message-ID → files, with duplicates allowed only for messages a UID MOVE was moving during the backup,
/// or that two sessions moved at once (then the source itself holds them twice, for good).
pub fn presence_problems(tracker: &Tracker, backup: &Path, start: u64, end: u64) -> Vec<String> {
    let ids = scan_message_ids(backup);
    let required = tracker.required(start, end);
    let mut problems = Vec::new();
    let missing: Vec<&String> = required.iter().filter(|m| !ids.contains_key(*m)).collect();
    if !missing.is_empty() {
        problems.push(format!("{} of {} required messages missing, e.g. {:?}", missing.len(), required.len(), &missing[..missing.len().min(5)]));
    }
    for (mid, paths) in &ids {
        if !tracker.is_known(mid) {
            problems.push(format!("unknown message {mid} at {paths:?}"));
        }
        // A message whose UID MOVE was in flight may be in both folders (Dovecot links it into the target
        // before it unlinks the source); any other copy is a duplicate.
        let excused = tracker.moved_concurrently(mid) || (paths.len() == 2 && tracker.moved_between(mid, start, end));
        if paths.len() > 1 && !excused {
            problems.push(format!("{mid} is in the backup {} times: {paths:?} (its moves, ticks: {:?}; backup {start}..{end})", paths.len(), tracker.moves_of(mid)));
        }
    }
    problems
}

/// One backup taken while a [`Churn`] ran: where it went, the [`Tracker`] ticks just before and just after
/// it, and its run.
pub struct ChurnBackup {
    pub dest: PathBuf,
    pub start: u64,
    pub end: u64,
    pub run: Run,
}

/// Takes `n` backups while `churn` runs: backup `i` is `backup(out/{prefix}{i})`, between two ticks of
/// `tracker`, and must exit 0; after each, waits for `settle.0` more churn operations (at most `settle.1`).
/// Then stops the churn, prints its statistics, and checks that it made every kind of change (flags, moves,
/// appends, expunges) and that some of its operations overlapped a backup. Returns the backups and what the
/// churn did.
pub fn backups_under_churn(
    churn: Churn,
    tracker: &Tracker,
    out: &Path,
    prefix: &str,
    n: usize,
    settle: (u64, Duration),
    mut backup: impl FnMut(&Path) -> Run,
) -> (Vec<ChurnBackup>, ChurnStats) {
    let mut runs = Vec::new();
    let mut ops_during = 0;
    for i in 0..n {
        let dest = out.join(format!("{prefix}{i}"));
        let ops0 = churn.ops();
        let start = tracker.tick();
        let run = backup(&dest);
        let end = tracker.tick();
        ops_during += churn.ops() - ops0;
        run.expect_ok();
        runs.push(ChurnBackup { dest, start, end, run });
        churn.wait_ops(settle.0, settle.1);
    }
    let stats = churn.stop();
    eprintln!("churn: {stats:?}; {ops_during} ops during the {n} backups");
    assert!(stats.moves > 0 && stats.flag_changes > 0 && stats.appends > 0 && stats.expunges > 0, "churn did too little: {stats:?}");
    assert!(ops_during > 0, "no churn operation overlapped a backup");
    (runs, stats)
}
