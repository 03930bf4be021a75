//! Harness for tests/hostile.rs: a hostile mail user (`mbhostile`) who owns her Maildir and attacks root's
//! `maildir-backup` runs over it, and a root-owned victim tree outside the Maildir that must never be touched.
//!
//! - [`World`]: one test's directory (0755, so she can traverse it): her home (hers, so she can swap even the
//!   Maildir root), her Maildir, a stash for her racers, and the [`Victim`].
//! - [`Victim`]: root-owned files and dirs (a `secret` holding a unique marker, a Maildir-shaped `mail/` whose
//!   messages hold the marker too). [`Victim::check`] proves nothing in it was created, changed, truncated,
//!   chowned or chmodded, and that the secret was never read (its atime is set far below its mtime, so any read
//!   moves it on this relatime filesystem).
//! - [`run_limited`]: every CLI run has a hard time limit (a hang is killed and fails the test) and reports the
//!   child's own peak RSS through `wait4`.
//! - [`Racer`]: a perl loop running as her (perl renames and symlinks in-process, thousands of times faster than
//!   mv/ln processes); stopped between two whole steps, so the layout is hers again afterwards.
//! - Synthetic Maildirs ([`build_maildir`]), no Dovecot needed.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::dovecot_common::tempdir;
use super::procs::mb;
use super::run::Run;
use super::repo_helpers::{assert_same_tree, tree_listing};

/// The hostile mail user.
pub const HOSTILE: &str = "mbhostile";
/// Hard limit on every CLI run: past it the run is killed and the test fails.
pub const CLI_LIMIT: Duration = Duration::from_secs(60);
/// Peak RSS allowed to a run facing a huge input.
pub const RSS_LIMIT_KIB: u64 = 100 * 1024;

// ---------------------------------------------------------------------------------------------
// The user

/// (uid, gid) of `mbhostile`, created on first use (a system user with no home and no shell). Safe when many
/// tests, or test processes, ask at once.
pub fn hostile_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        if let Some(ids) = getent_ids() {
            return ids;
        }
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", HOSTILE])
            .output()
            .expect("run useradd");
        // Another process may have created her meanwhile: what counts is that she exists now.
        getent_ids().unwrap_or_else(|| panic!("useradd {HOSTILE}: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr)))
    })
}

fn getent_ids() -> Option<(u32, u32)> {
    let out = Command::new("getent").args(["passwd", HOSTILE]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = line.trim().split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// `PROGRAM` run as her: `setpriv --reuid=mbhostile --regid=mbhostile --clear-groups -- PROGRAM`.
pub fn as_her(program: &str) -> Command {
    hostile_ids();
    let mut c = Command::new("setpriv");
    c.args([&format!("--reuid={HOSTILE}"), &format!("--regid={HOSTILE}"), "--clear-groups", "--", program]);
    c.stdin(Stdio::null());
    c
}

/// Runs a perl script as her with `args` as @ARGV; panics unless it exits 0.
pub fn her_perl<S: AsRef<OsStr>>(script: &str, args: &[S]) -> Out {
    let mut c = as_her("perl");
    c.arg("-e").arg(script).args(args);
    let o = run_limited(c, CLI_LIMIT);
    assert_eq!(o.code(), Some(0), "perl as {HOSTILE} failed:\n{}", o.show());
    o
}

// ---------------------------------------------------------------------------------------------
// Running with a time limit and the child's own peak RSS

/// A finished process ([`Run`], which it dereferences to) with its pid and its own peak RSS.
pub struct Out {
    pub run: Run,
    pub pid: i32,
    /// The child's own peak RSS in KiB (`ru_maxrss` from `wait4` on its pid).
    pub maxrss_kib: u64,
}

impl std::ops::Deref for Out {
    type Target = Run;
    fn deref(&self) -> &Run {
        &self.run
    }
}

impl Out {
    /// [`Run::show`] with the pid and peak RSS, the output clipped.
    pub fn show(&self) -> String {
        format!(
            "$ {}\n  pid {} {} after {:.2?}, peak RSS {} KiB\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.pid, self.status, self.elapsed, self.maxrss_kib, clip(&self.stdout), clip(&self.stderr)
        )
    }
    pub fn ok(&self) -> bool {
        self.code() == Some(0)
    }
    /// A stderr line holding every one of `words`.
    pub fn stderr_line_with(&self, words: &[&str]) -> bool {
        self.stderr.lines().any(|l| words.iter().all(|w| l.contains(w)))
    }
    /// A stderr line naming `name` and saying "symlink" (in any case).
    pub fn says_symlink(&self, name: &str) -> bool {
        self.stderr.lines().any(|l| l.contains(name) && l.to_lowercase().contains("symlink"))
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 6000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes more)", &s[..end], s.len() - end)
}

/// Kills and reaps a child that was not reaped (a panic while it ran).
struct Reaper(Option<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
    }
}

/// Runs `cmd` (stdin null, output to temp files) and reaps it with `wait4` for its own rusage. Past `limit`
/// it is SIGKILLed, reaped, and the test panics: a hang is a failure, never a hung test.
pub fn run_limited(mut cmd: Command, limit: Duration) -> Out {
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(err.try_clone().unwrap());
    let what = describe(&cmd);
    let started = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id() as i32;
    drop(child); // std neither kills nor waits on drop: the pid is ours to reap
    let mut reaper = Reaper(Some(pid));
    let (status, ru) = loop {
        let mut status = 0;
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            reaper.0 = None;
            break (status, ru);
        }
        assert!(r == 0 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted, "wait4 {pid}: {}", std::io::Error::last_os_error());
        if started.elapsed() > limit {
            drop(reaper);
            panic!("{what}\n  still running after {limit:?}: killed (a hang)\n--- stderr so far ---\n{}", clip(&read_back(&mut err)));
        }
        thread::sleep(Duration::from_millis(3));
    };
    Out {
        run: Run {
            cmdline: what,
            status: ExitStatus::from_raw(status),
            stdout: read_back(&mut out),
            stderr: read_back(&mut err),
            elapsed: started.elapsed(),
        },
        pid,
        maxrss_kib: ru.ru_maxrss as u64,
    }
}

fn read_back(f: &mut File) -> String {
    use std::io::{Seek, SeekFrom};
    let mut s = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut s).unwrap();
    String::from_utf8_lossy(&s).into_owned()
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
}

/// `maildir-backup ARGS...` within [`CLI_LIMIT`].
pub fn cli<S: AsRef<OsStr>>(args: &[S]) -> Out {
    let mut c = mb();
    c.args(args);
    run_limited(c, CLI_LIMIT)
}

/// `maildir-backup backup -q --lock-timeout 10 SOURCE DEST`.
pub fn backup(source: &Path, dest: &Path) -> Out {
    backup_with(source, dest, &[])
}

/// [`backup`] with more options (e.g. `--link`).
pub fn backup_with(source: &Path, dest: &Path, extra: &[&str]) -> Out {
    let mut args = vec![OsStr::new("backup"), OsStr::new("-q"), OsStr::new("--lock-timeout"), OsStr::new("10")];
    args.extend(extra.iter().map(OsStr::new));
    args.extend([source.as_os_str(), dest.as_os_str()]);
    cli(&args)
}

/// `maildir-backup restore --lock-timeout 10 SNAPSHOT TARGET`.
pub fn restore(snapshot: &Path, target: &Path) -> Out {
    cli(&[OsStr::new("restore"), OsStr::new("--lock-timeout"), OsStr::new("10"), snapshot.as_os_str(), target.as_os_str()])
}

/// `maildir-backup verify DIR`.
pub fn verify(dir: &Path) -> Out {
    cli(&[OsStr::new("verify"), dir.as_os_str()])
}

// ---------------------------------------------------------------------------------------------
// Racers

/// Runs around every racer body: SIGTERM only sets a flag, checked between two whole `step()`s, so a stopped
/// racer leaves the layout as it found it. It also stops by itself after 300 s or when the test process is
/// gone. Prints `ready` after its first step and `steps N` (N = what `step` returned, summed) at the end.
const RACER_FRAME: &str = r#"
use strict; use warnings;
$| = 1;
my $stop = 0;
$SIG{TERM} = sub { $stop = 1 };
my $parent = getppid();
my $deadline = time + 300;
my ($n, $iter) = (0, 0);
sub pause { select(undef, undef, undef, $_[0]) }
BODY
while (!$stop) {
    $n += step();
    $iter++;
    print "ready\n" if $iter == 1;
    last if $iter % 16 == 0 && (time > $deadline || getppid() != $parent);
}
print "steps $n\n";
"#;

/// A perl loop racing as her. [`Racer::stop`] ends it between two steps; dropping it kills it.
pub struct Racer {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Racer {
    /// Starts `body` (perl defining `sub step`, which returns how many attacks it made) with `args` as
    /// @ARGV, and waits until its first step is done.
    pub fn start<S: AsRef<OsStr>>(what: &str, body: &str, args: &[S]) -> Racer {
        let mut c = as_her("perl");
        c.arg("-e").arg(RACER_FRAME.replace("BODY", body)).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("start racer {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let r = Racer { child: Some(child), lines, what: what.to_string() };
        match r.lines.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l == "ready" => r,
            other => panic!("racer {what} did not start: {other:?}"),
        }
    }

    /// Stops the loop after its current step; returns how many attacks it made.
    pub fn stop(mut self) -> u64 {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let last = self.lines.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
                let n = last.strip_prefix("steps ").and_then(|n| n.parse().ok());
                return n.unwrap_or_else(|| panic!("racer {} ended with {st} and said {last:?}", self.what));
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("racer {} did not stop within 20 s", self.what);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Racer body, @ARGV = (stash dir, victim dir, victim file, "d:PATH" | "f:PATH" | "t:DIR" ...): for each PATH
/// in turn, renames the real one into the stash, puts a symlink in its place (to the victim dir for `d:`, the
/// victim file for `f:`), leaves it a moment, removes it and renames the real one back. Whatever root created
/// at PATH meanwhile is moved aside into the stash as an `intruder`. With `t:DIR`s, it lies low until something
/// appears in one of them (root has checked the layout and started writing), as a patient attacker would, or
/// for a random 0-100 ms at most (so some rounds strike during the checks, others later, and a tool that
/// never names a file in tmp/ is attacked all the same).
pub const SWAP_BODY: &str = r#"
use Time::HiRes ();
my ($stash, $vdir, $vfile, @args) = @ARGV;
my @paths = grep { !/^t:/ } @args;
my @triggers = map { substr($_, 2) } grep { /^t:/ } @args;
my $armed = !@triggers;
my $lie_low_until = Time::HiRes::time() + rand(0.1);
sub triggered {
    return 1 if Time::HiRes::time() > $lie_low_until;
    for my $d (@triggers) {
        opendir(my $h, $d) or next;
        my @e = grep { $_ ne '.' && $_ ne '..' } readdir $h;
        return 1 if @e;
    }
    return 0;
}
sub put_back {
    my ($p, $away) = @_;
    for my $k (0 .. 1000) {
        return 1 if rename($away, $p);
        rename($p, "$stash/intruder.$$.$iter.$k") or unlink($p);
    }
    return 0;
}
sub step {
    unless ($armed) {
        $armed = triggered();
        pause(0.0001) unless $armed;
        return 0 unless $armed;
    }
    my $s = 0;
    for my $i (0 .. $#paths) {
        my ($kind, $p) = split /:/, $paths[$i], 2;
        my $away = "$stash/$i";
        next unless rename($p, $away);
        $s++ if symlink($kind eq 'd' ? $vdir : $vfile, $p);
        pause(0.0004);
        unlink($p) if -l $p;
        put_back($p, $away) or die "cannot put $p back";
        pause(0.0002);
    }
    return $s;
}
"#;

/// Racer body, @ARGV = (symlink target, DIR...): replaces every file that appears in the DIRs with a
/// symlink to the target. It learns of each new name from inotify (raw syscalls: no module needed), so it
/// strikes within microseconds of the file's creation.
pub const TMP_HIJACK_BODY: &str = r#"
require 'syscall.ph';
my ($target, @dirs) = @ARGV;
my $fd = syscall(&SYS_inotify_init1, 0);
die "inotify_init1: $!" if $fd < 0;
my %dir_of;
for my $d (@dirs) {
    my $w = syscall(&SYS_inotify_add_watch, $fd, $d, 0x100 | 0x80); # IN_CREATE | IN_MOVED_TO
    die "inotify_add_watch $d: $!" if $w < 0;
    $dir_of{$w} = $d;
}
open(my $in, '<&=', $fd) or die "fdopen: $!";
my $bits = '';
vec($bits, $fd, 1) = 1;
sub hijack {
    my $p = shift;
    return 0 if !lstat($p) || -l _ || -d _;
    return (unlink($p) && symlink($target, $p)) ? 1 : 0;
}
sub step {
    my $r = $bits;
    return 0 unless select($r, undef, undef, 0.05) > 0;
    my $buf;
    defined(sysread($in, $buf, 1 << 16)) or return 0;
    my ($off, $s) = (0, 0);
    while ($off + 16 <= length $buf) {
        my ($w, $mask, $cookie, $len) = unpack('i I I I', substr($buf, $off, 16));
        my $name = unpack('Z*', substr($buf, $off + 16, $len));
        $off += 16 + $len;
        $s += hijack("$dir_of{$w}/$name") if defined $dir_of{$w} && length $name;
    }
    return $s;
}
"#;

// ---------------------------------------------------------------------------------------------
// The victim

/// A root-owned tree outside the Maildir.
pub struct Victim {
    pub root: PathBuf,
    /// 0600, holds the marker, parses both as a dovecot-uidlist and as a dovecot-keywords file (so a leak
    /// through either parser would show).
    pub secret: PathBuf,
    /// A Maildir-shaped dir (cur/ new/ tmp/, message-named files and a uidlist holding the marker).
    pub mail: PathBuf,
    /// A plain dir with a file and a 0700 subdir.
    pub sub: PathBuf,
    pub marker: String,
    /// What the secret holds (so a test never has to read it).
    pub secret_text: String,
    before: std::cell::RefCell<BTreeMap<String, String>>,
    secret_atime: std::cell::Cell<(i64, i64)>,
}

impl Victim {
    pub fn create(parent: &Path) -> Victim {
        let mut r = [0u8; 8];
        getrandom::getrandom(&mut r).unwrap();
        let marker = format!("SECRET-{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let root = parent.join("victim");
        let v = Victim {
            secret: root.join("secret"),
            mail: root.join("mail"),
            sub: root.join("sub"),
            secret_text: format!("3 V1700000000 N2 G{marker}\n1 :{marker},S=40\nroot:$6${marker}$:19000:0:99999:7:::\n"),
            root,
            marker,
            before: Default::default(),
            secret_atime: Default::default(),
        };
        v.populate();
        v
    }

    /// (Re)creates the whole tree, takes it as the reference and arms the secret's atime.
    fn populate(&self) {
        let _ = fs::remove_dir_all(&self.root);
        let marker = &self.marker;
        for d in [&self.root, &self.sub, &self.mail.join("cur"), &self.mail.join("new"), &self.mail.join("tmp")] {
            fs::create_dir_all(d).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let put = |p: &Path, mode: u32, text: &str| {
            fs::write(p, text).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        };
        put(&self.secret, 0o600, &self.secret_text);
        put(&self.root.join("notes.txt"), 0o644, "nothing to see\n");
        put(&self.sub.join("inner.conf"), 0o644, "inner=1\n");
        let deeper = self.sub.join("deeper");
        fs::create_dir(&deeper).unwrap();
        fs::set_permissions(&deeper, fs::Permissions::from_mode(0o700)).unwrap();
        put(&deeper.join("key"), 0o600, &format!("key {marker}\n"));
        for (i, (d, name)) in [("cur", ":2,S"), ("cur", ":2,FS"), ("new", "")].iter().enumerate() {
            let body = format!("From: root@victim\r\nSubject: {marker}\r\n\r\n{marker}\r\n");
            let unique = format!("1700009{i:03}.M{i}P1.victim,S={}", body.len());
            put(&self.mail.join(d).join(format!("{unique}{name}")), 0o600, &body);
        }
        put(&self.mail.join("dovecot-uidlist"), 0o600, &format!("3 V1 N9 G{marker}\n1 :1700009000.M0P1.victim\n"));
        put(&self.mail.join("dovecot-keywords"), 0o600, &format!("0 {marker}\n"));
        *self.before.borrow_mut() = tree_listing(&self.root);
        self.arm();
    }

    /// Sets the secret's atime a year below its mtime: on a relatime filesystem any read moves it.
    fn arm(&self) {
        let md = fs::symlink_metadata(&self.secret).unwrap();
        let old = TimeSpec::new(md.mtime() - 400 * 86_400, 0);
        utimensat(None, &self.secret, &old, &TimeSpec::UTIME_OMIT, UtimensatFlags::NoFollowSymlink).unwrap();
        let md = fs::symlink_metadata(&self.secret).unwrap();
        self.secret_atime.set((md.atime(), md.atime_nsec()));
    }

    /// Panics unless the victim is exactly as created: same entries, types, modes, owners, sizes, mtimes,
    /// contents, and the secret never read. `what` says after which attack.
    pub fn check(&self, what: &str) {
        // The atime first: the listing below reads the files.
        let md = fs::symlink_metadata(&self.secret).unwrap_or_else(|e| panic!("{what}: the victim's secret: {e}"));
        let atime = (md.atime(), md.atime_nsec());
        let after = tree_listing(&self.root);
        assert_same_tree(&self.before.borrow(), &after, &format!("{what}: the victim outside the Maildir"));
        assert_eq!(atime, self.secret_atime.get(), "{what}: the victim's secret was read (its atime moved)");
        self.arm();
    }

    /// Recreates the victim as it was (after a failed case, so later cases judge only themselves).
    pub fn reset(&self) {
        self.populate();
    }

    /// Panics if the marker is in `out`'s output or in any regular file below `dirs`.
    pub fn assert_not_leaked(&self, out: Option<&Out>, dirs: &[&Path], what: &str) {
        if let Some(o) = out {
            assert!(!o.stdout.contains(&self.marker) && !o.stderr.contains(&self.marker), "{what}: the secret marker is in the output:\n{}", o.show());
        }
        for d in dirs {
            let found = files_containing(d, self.marker.as_bytes());
            assert!(found.is_empty(), "{what}: the secret marker {} is in {found:?}", self.marker);
        }
    }
}

/// Runs a test's cases one by one, each to its end even when an earlier one failed, then fails listing every
/// failed case (each case's own panic message is printed as it happens).
pub struct Cases<'a> {
    victim: &'a Victim,
    failed: Vec<String>,
    total: usize,
}

impl<'a> Cases<'a> {
    pub fn new(victim: &'a Victim) -> Cases<'a> {
        Cases { victim, failed: Vec::new(), total: 0 }
    }

    pub fn run(&mut self, name: &str, f: impl FnOnce()) {
        self.total += 1;
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            let head: Vec<&str> = msg.lines().take(3).collect();
            self.failed.push(format!("{name}: {}", head.join(" / ")));
            self.victim.reset();
        }
    }

    pub fn finish(self) {
        assert!(self.failed.is_empty(), "{} of {} cases failed:\n{}", self.failed.len(), self.total, self.failed.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// Looking at trees

/// Every regular file below `root` (symlinks never followed) that holds `needle`. Reads only the data
/// extents of sparse files (SEEK_DATA/SEEK_HOLE), in 1 MiB chunks, so a 2 GiB sparse file is cheap.
pub fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(root, &mut |p, md| {
        if md.is_file() && file_contains(p, needle) {
            found.push(p.to_path_buf());
        }
    });
    found
}

/// Calls `f` on `root` and everything below it, never following a symlink.
pub fn walk(root: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let Ok(md) = fs::symlink_metadata(root) else { return };
    f(root, &md);
    if md.is_dir() {
        let mut kids: Vec<PathBuf> = fs::read_dir(root).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        kids.sort();
        for k in kids {
            walk(&k, f);
        }
    }
}

fn file_contains(p: &Path, needle: &[u8]) -> bool {
    let Ok(f) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(p) else { return false };
    let fd = f.as_raw_fd();
    let len = f.metadata().map(|m| m.len() as i64).unwrap_or(0);
    let mut buf = vec![0u8; 1 << 20];
    let keep = needle.len().saturating_sub(1);
    let mut pos = 0i64;
    while pos < len {
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.max(data);
        let mut off = data;
        let mut carry: Vec<u8> = Vec::new();
        while off < hole {
            let want = ((hole - off) as usize).min(buf.len());
            let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), want, off) };
            if n <= 0 {
                break;
            }
            carry.extend_from_slice(&buf[..n as usize]);
            if carry.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            carry.drain(..carry.len().saturating_sub(keep));
            off += n as i64;
        }
        pos = hole.max(pos + 1);
    }
    false
}

/// BLAKE3 of a file, streamed (never a whole file in memory: the peak RSS of every child includes ours).
pub fn hash_streamed(p: &Path) -> Option<String> {
    let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(p).ok()?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            return Some(h.finalize().to_hex().to_string());
        }
        h.update(&buf[..n]);
    }
}

/// Content hash → count of the regular message files in `cur/` and `new/` of every folder of a Maildir++
/// tree (the root and its real `.Name` dirs; symlinks are never followed). Files over 64 MiB are not
/// hashed but counted as `big:<size>`.
pub fn mail_hashes(root: &Path) -> BTreeMap<String, usize> {
    let mut out = folder_hashes(root);
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                for (h, n) in folder_hashes(&e.path()) {
                    *out.entry(h).or_insert(0) += n;
                }
            }
        }
    }
    out
}

/// [`mail_hashes`] of one folder dir only.
pub fn folder_hashes(folder: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for sub in ["cur", "new"] {
        let d = folder.join(sub);
        if !fs::symlink_metadata(&d).map(|m| m.is_dir()).unwrap_or(false) {
            continue;
        }
        for e in fs::read_dir(&d).unwrap().flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else { continue };
            let key = if !md.is_file() {
                continue;
            } else if md.len() > 64 << 20 {
                Some(format!("big:{}", md.len()))
            } else {
                hash_streamed(&e.path())
            };
            if let Some(k) = key {
                *out.entry(k).or_insert(0) += 1;
            }
        }
    }
    out
}

/// Panics unless every message of `want` (from [`mail_hashes`]) is in `have` at least as often.
pub fn assert_mail_kept(want: &BTreeMap<String, usize>, have: &BTreeMap<String, usize>, what: &str) {
    let missing: Vec<&String> = want.iter().filter(|(h, n)| have.get(*h).copied().unwrap_or(0) < **n).map(|(h, _)| h).collect();
    assert!(missing.is_empty(), "{what}: {} of {} messages missing (by content hash), e.g. {:?}", missing.len(), want.len(), &missing[..missing.len().min(3)]);
}

/// Paths of every `dovecot-uidlist.lock` below `root`.
pub fn uidlist_locks(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(root, &mut |p, _| {
        if p.file_name().is_some_and(|n| n == "dovecot-uidlist.lock") {
            found.push(p.to_path_buf());
        }
    });
    found
}

/// lchowns everything below `p` (never following a symlink).
pub fn chown_tree(p: &Path, uid: u32, gid: u32) {
    walk(p, &mut |q, _| lchown(q, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("lchown {}: {e}", q.display())));
}

/// Removes whatever is at `p` (file, symlink, special file or tree); nothing if absent.
pub fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display())),
        Ok(_) => fs::remove_file(p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display())),
        Err(_) => {}
    }
}

/// "fifo", "socket", "char device", "symlink", "dir", "file".
pub fn kind_of(p: &Path) -> &'static str {
    match fs::symlink_metadata(p) {
        Err(_) => "missing",
        Ok(m) if m.file_type().is_fifo() => "fifo",
        Ok(m) if m.file_type().is_socket() => "socket",
        Ok(m) if m.file_type().is_char_device() => "char device",
        Ok(m) if m.file_type().is_symlink() => "symlink",
        Ok(m) if m.is_dir() => "dir",
        Ok(_) => "file",
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic Maildirs

/// The file name of message `i` (of folder number `fi`) in a Maildir tagged `tag`: `(sub, name)`.
fn message_name(tag: &str, fi: usize, i: usize, size: usize) -> (&'static str, String, String) {
    let unique = format!("{}.M{}P{}.{tag},S={size}", 1_700_000_000 + i, i + 1, 4000 + fi);
    if i % 5 == 4 {
        return ("new", unique.clone(), unique);
    }
    let flags = ["Sa", "S", "FSb"][i % 3];
    ("cur", format!("{unique}:2,{flags}"), unique)
}

/// Builds a Dovecot-like Maildir++ at `root` (which must not exist): `folders` = (dir, messages), "" being
/// INBOX. Each folder gets cur/ new/ tmp/, messages (some in new/, some with keyword letters a and b), a
/// dovecot-uidlist and a dovecot-keywords (`keywords`); subfolders a `maildirfolder`; the root
/// `subscriptions` and `dovecot-uidvalidity` files. Message contents are unique to `tag`.
pub fn build_maildir(root: &Path, tag: &str, folders: &[(&str, usize)], keywords: &str) {
    fs::create_dir_all(root.parent().unwrap()).unwrap();
    fs::create_dir(root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    for (fi, (dir, n)) in folders.iter().enumerate() {
        let f = root.join(dir);
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(f.join(sub)).unwrap();
        }
        if !dir.is_empty() {
            fs::write(f.join("maildirfolder"), b"").unwrap();
        }
        let mut uidlist = format!("3 V{} N{} G{:032x}\n", 1_690_000_000 + fi, n + 1, 0xabcd_0000 + fi);
        for i in 0..*n {
            let mut body = format!(
                "From: sender{i}@example.org\r\nTo: {tag}@example.org\r\nMessage-ID: <{tag}.{fi}.{i}@hostile.test>\r\nSubject: {tag} {dir} {i}\r\n\r\n"
            );
            while body.len() < 600 + 37 * i % 900 {
                body.push_str("All work and no play makes a dull mailbox.\r\n");
            }
            let (sub, name, unique) = message_name(tag, fi, i, body.len());
            let p = f.join(sub).join(name);
            fs::write(&p, &body).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            uidlist.push_str(&format!("{} :{unique}\n", i + 1));
        }
        fs::write(f.join("dovecot-uidlist"), uidlist).unwrap();
        fs::write(f.join("dovecot-keywords"), keywords).unwrap();
    }
    let subs: String = folders.iter().filter(|(d, _)| !d.is_empty()).map(|(d, _)| format!("{}\n", d.trim_start_matches('.'))).collect();
    fs::write(root.join("subscriptions"), subs).unwrap();
    fs::write(root.join("dovecot-uidvalidity"), "65a1b2c3\n").unwrap();
    fs::write(root.join("dovecot-uidvalidity.65a1b2c3"), "").unwrap();
}

// ---------------------------------------------------------------------------------------------
// A test's world

pub struct World {
    _dir: tempfile::TempDir,
    /// The test's directory (root-owned, 0755).
    pub top: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Her home: hers, so she can swap the Maildir itself.
    pub home: PathBuf,
    pub maildir: PathBuf,
    /// Where her racers park what they swap out.
    pub stash: PathBuf,
    pub victim: Victim,
}

impl World {
    pub fn new() -> World {
        let (uid, gid) = hostile_ids();
        let dir = tempdir();
        let top = dir.path().to_path_buf();
        let home = top.join("home");
        let stash = home.join("stash");
        fs::create_dir_all(&stash).unwrap();
        chown_tree(&home, uid, gid);
        let victim = Victim::create(&top);
        World { maildir: home.join("Maildir"), _dir: dir, top, uid, gid, home, stash, victim }
    }

    /// (Re)builds her Maildir from scratch (see [`build_maildir`]), all hers.
    pub fn her_maildir(&self, folders: &[(&str, usize)]) {
        remove_any(&self.maildir);
        build_maildir(&self.maildir, "hers", folders, "0 Private\n");
        chown_tree(&self.maildir, self.uid, self.gid);
    }

    /// Replaces `rel` (in her Maildir) with a symlink of hers to `target`.
    pub fn plant_symlink(&self, rel: &str, target: &Path) -> PathBuf {
        let p = self.maildir.join(rel);
        remove_any(&p);
        symlink(target, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        lchown(&p, Some(self.uid), Some(self.gid)).unwrap();
        p
    }

    /// A clean Maildir built by root at `top/NAME/Maildir` (tag "snap", keyword flags $Work and Later), backed
    /// up as root into `top/repo`; returns (snapshot dir, the clean Maildir).
    pub fn clean_snapshot(&self, name: &str, folders: &[(&str, usize)]) -> (PathBuf, PathBuf) {
        let repo = self.top.join("repo");
        self.clean_backup(name, folders, &[OsStr::new("--repo"), repo.as_os_str(), OsStr::new("--name"), OsStr::new(name)])
    }

    /// A plain backup (each folder's own directories, every record in its manifest) of a clean
    /// Maildir, and the Maildir: (backup, source).
    pub fn clean_plain_backup(&self, name: &str, folders: &[(&str, usize)]) -> (PathBuf, PathBuf) {
        let dest = self.top.join(format!("{name}-backup"));
        self.clean_backup(name, folders, &[dest.as_os_str()])
    }

    fn clean_backup(&self, name: &str, folders: &[(&str, usize)], to: &[&OsStr]) -> (PathBuf, PathBuf) {
        let src = self.top.join(name).join("Maildir");
        build_maildir(&src, &format!("snap-{name}"), folders, "0 $Work\n1 Later\n");
        let mut args = vec![OsStr::new("backup"), OsStr::new("--json"), src.as_os_str()];
        args.extend(to);
        let o = cli(&args);
        assert!(o.ok(), "snapshot of the clean Maildir:\n{}", o.show());
        let j: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", o.show()));
        (PathBuf::from(j["destination"].as_str().unwrap()), src)
    }

    /// Panics if a racer left something it swapped out in the stash (then the layout is not hers any more
    /// and later checks would mislead).
    pub fn assert_stash_clean(&self) {
        let left: Vec<String> = fs::read_dir(&self.stash)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("intruder."))
            .collect();
        assert!(left.is_empty(), "the racer did not put back {left:?}");
    }

    /// Arguments for [`SWAP_BODY`]: swap `dirs` and `files`, once something appears in one of `triggers`
    /// (at once if none); all relative to her Maildir.
    pub fn swap_args(&self, dirs: &[&str], files: &[&str], triggers: &[&str]) -> Vec<String> {
        let mut a = vec![self.stash.display().to_string(), self.victim.mail.display().to_string(), self.victim.secret.display().to_string()];
        for (kind, rels) in [("d", dirs), ("f", files), ("t", triggers)] {
            a.extend(rels.iter().map(|r| format!("{kind}:{}", self.maildir.join(r).display())));
        }
        a
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// The pids the next `n` processes will most likely get (from the kernel's last pid, wrapping at pid_max).
pub fn next_pids(n: u32) -> Vec<u32> {
    let read = |p: &str| fs::read_to_string(p).unwrap().trim().parse::<u32>().unwrap();
    let last = read("/proc/sys/kernel/ns_last_pid");
    let max = read("/proc/sys/kernel/pid_max");
    (1..=n)
        .map(|k| {
            let p = last + k;
            if p >= max { 300 + (p - max) } else { p }
        })
        .collect()
}

impl World {
    /// Plants, in each of `dirs` of her Maildir, symlinks to the secret named like the temp files of the old
    /// code (`dovecot-uidlist.maildir-backup-restore.PID`, `dovecot-keywords.maildir-backup.PID`) for the
    /// next 2000 pids, planting on until the window ahead of the kernel's last pid is covered (other tests
    /// spawn processes and threads meanwhile). Returns the pids covered and the symlinks.
    pub fn spray_old_temp_names(&self, dirs: &[&str]) -> (std::collections::BTreeSet<u32>, Vec<PathBuf>) {
        let mut pids = std::collections::BTreeSet::new();
        let mut planted = Vec::new();
        let t = Instant::now();
        loop {
            let missing: Vec<u32> = next_pids(2000).into_iter().filter(|p| !pids.contains(p)).collect();
            if missing.len() < 100 && pids.len() >= 2000 {
                return (pids, planted);
            }
            assert!(t.elapsed() < Duration::from_secs(30), "pids are used up faster than symlinks can be planted");
            for pid in missing {
                for dir in dirs {
                    for name in [format!("dovecot-uidlist.maildir-backup-restore.{pid}"), format!("dovecot-keywords.maildir-backup.{pid}")] {
                        planted.push(self.plant_symlink(&Path::new(dir).join(name).to_string_lossy(), &self.victim.secret));
                    }
                }
                pids.insert(pid);
            }
        }
    }
}
