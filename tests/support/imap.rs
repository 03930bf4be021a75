//! A minimal but real IMAP4rev1 client over a plain `TcpStream`.
//!
//! - Tagged commands (`A0001`, `A0002`, ...). [`Imap::command`] returns the untagged responses received
//!   before the tagged `OK`, or `Err(text after the tag)` on `NO`/`BAD`.
//! - Server literals (`{N}\r\n` + N bytes) are inlined into the line they belong to, so a
//!   `FETCH (BODY[] {123}` response comes back as one `String` (lossy UTF-8).
//! - Client literals: synchronizing for [`Imap::append`], `LITERAL+` for [`Imap::append_many`]
//!   (MULTIAPPEND) when the server advertises it.
//! - Mailbox names are sent quoted and modified-UTF-7 encoded ([`imap_quote`]).
//! - Reads time out after 200 s by default (longer than Dovecot's 122 s lock wait); a timed-out read keeps
//!   everything received so far, so [`Imap::read_tagged`] can simply be called again for the same tag.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::dovecot_common::normalize_flags;

pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(200);

pub struct Imap {
    stream: TcpStream,
    /// Received, not yet consumed bytes.
    rbuf: Vec<u8>,
    next_tag: u32,
    /// Untagged lines received for the command in flight (kept across read timeouts).
    pending: Vec<Vec<u8>>,
    caps: Vec<String>,
    /// The server greeting line.
    pub greeting: String,
    read_timeout: Option<Duration>,
}

/// Does this `Err` from [`Imap`] mean a read timed out (rather than a `NO`/`BAD` reply)?
pub fn is_timeout(err: &str) -> bool {
    err.starts_with("timeout:")
}

/// Modified UTF-7 (RFC 3501 §5.1.3) encoding of a mailbox name.
pub fn mutf7_encode(name: &str) -> String {
    fn flush(out: &mut String, run: &mut Vec<u16>) {
        if run.is_empty() {
            return;
        }
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";
        let bytes: Vec<u8> = run.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
            let chars = chunk.len() + 1; // 1 byte → 2 chars, 2 → 3, 3 → 4 (no padding)
            for k in 0..chars {
                out.push(B64[((n >> (18 - 6 * k)) & 63) as usize] as char);
            }
        }
        out.push('-');
        run.clear();
    }
    let mut out = String::new();
    let mut run: Vec<u16> = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut run);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            run.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut out, &mut run);
    out
}

/// A mailbox name as an IMAP quoted string (modified UTF-7, `\` and `"` escaped).
pub fn imap_quote(name: &str) -> String {
    let m = mutf7_encode(name);
    format!("\"{}\"", m.replace('\\', "\\\\").replace('"', "\\\""))
}

fn quote_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// If `seg` ends with a literal announcement `{N}` / `{N+}`, return N.
fn literal_len(seg: &[u8]) -> Option<usize> {
    if !seg.ends_with(b"}") {
        return None;
    }
    let open = seg.iter().rposition(|&b| b == b'{')?;
    let inner = &seg[open + 1..seg.len() - 1];
    let inner = inner.strip_suffix(b"+").unwrap_or(inner);
    if inner.is_empty() || !inner.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// Parse one complete logical line (literals inlined) from the start of `buf`:
/// `Ok((bytes consumed, line without the final CRLF))`, or `Err(n)`: incomplete, retry once `buf` holds
/// at least `n` bytes.
fn parse_logical_line(buf: &[u8]) -> Result<(usize, Vec<u8>), usize> {
    let mut pos = 0;
    let mut line = Vec::new();
    loop {
        let rel = buf[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(buf.len() + 1)?;
        let seg = &buf[pos..pos + rel];
        line.extend_from_slice(seg);
        let after = pos + rel + 2;
        match literal_len(seg) {
            Some(n) => {
                if buf.len() < after + n {
                    return Err(after + n);
                }
                line.extend_from_slice(b"\r\n");
                line.extend_from_slice(&buf[after..after + n]);
                pos = after + n;
            }
            None => return Ok((after, line)),
        }
    }
}

impl Imap {
    /// Connect to 127.0.0.1:port and read the greeting (must be `* OK`).
    pub fn connect(port: u16) -> Imap {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("IMAP connect to 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).ok();
        stream.set_write_timeout(Some(Duration::from_secs(60))).ok();
        let mut imap = Imap {
            stream,
            rbuf: Vec::new(),
            next_tag: 1,
            pending: Vec::new(),
            caps: Vec::new(),
            greeting: String::new(),
            read_timeout: None,
        };
        imap.set_read_timeout(Some(DEFAULT_READ_TIMEOUT));
        let g = imap
            .read_line()
            .unwrap_or_else(|e| panic!("IMAP greeting from port {port}: {e}"));
        if !g.starts_with("* OK") {
            panic!("unexpected IMAP greeting from port {port}: {g}");
        }
        imap.caps = parse_caps_code(&g);
        imap.greeting = g;
        imap
    }

    /// `LOGIN user pass`; panics on failure. Refreshes the capability list afterwards.
    pub fn login(&mut self, user: &str, pass: &str) {
        if let Err(e) = self.command(&format!("LOGIN {} {}", quote_str(user), quote_str(pass))) {
            panic!("IMAP LOGIN as {user} failed: {e}");
        }
        self.refresh_capabilities();
    }

    /// Re-read CAPABILITY.
    pub fn refresh_capabilities(&mut self) {
        let lines = self
            .command("CAPABILITY")
            .unwrap_or_else(|e| panic!("CAPABILITY failed: {e}"));
        for l in lines {
            if let Some(rest) = l.strip_prefix("* CAPABILITY ") {
                self.caps = rest
                    .split_whitespace()
                    .map(|s| s.to_ascii_uppercase())
                    .collect();
            }
        }
    }

    /// Capabilities (upper case) as last seen.
    pub fn capabilities(&self) -> &[String] {
        &self.caps
    }

    pub fn has_capability(&self, cap: &str) -> bool {
        self.caps.iter().any(|c| c.eq_ignore_ascii_case(cap))
    }

    pub fn set_read_timeout(&mut self, d: Option<Duration>) {
        self.read_timeout = d;
        self.stream.set_read_timeout(d).expect("set_read_timeout");
    }

    pub fn read_timeout(&self) -> Option<Duration> {
        self.read_timeout
    }

    fn new_tag(&mut self) -> String {
        let t = format!("A{:04}", self.next_tag);
        self.next_tag += 1;
        t
    }

    fn write_all(&mut self, data: &[u8]) {
        self.stream
            .write_all(data)
            .unwrap_or_else(|e| panic!("IMAP write: {e}"));
    }

    fn read_line(&mut self) -> Result<String, String> {
        self.read_line_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
    }

    /// Read one logical line (literals inlined, CRLF stripped). Timeouts → `Err("timeout: ...")`; nothing
    /// received is lost.
    fn read_line_bytes(&mut self) -> Result<Vec<u8>, String> {
        let mut need = 0;
        loop {
            if self.rbuf.len() >= need {
                match parse_logical_line(&self.rbuf) {
                    Ok((used, line)) => {
                        self.rbuf.drain(..used);
                        return Ok(line);
                    }
                    Err(n) => need = n,
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("connection closed by server".to_string()),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!(
                        "timeout: no complete response line within {:?}",
                        self.read_timeout
                    ))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// Send `<tag> line\r\n` without waiting; returns the tag. Pair with [`Self::read_tagged`].
    pub fn send_raw(&mut self, line: &str) -> String {
        let tag = self.new_tag();
        self.write_all(format!("{tag} {line}\r\n").as_bytes());
        tag
    }

    /// Read until the tagged response for `tag`: `Ok(untagged lines)` on OK, `Err(text)` on NO/BAD,
    /// `Err("timeout: ...")` if the read timeout expires first (call again to keep waiting).
    pub fn read_tagged(&mut self, tag: &str) -> Result<Vec<String>, String> {
        self.read_tagged_bytes(tag).map(|v| {
            v.into_iter()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
                .collect()
        })
    }

    /// [`Self::read_tagged`] with the untagged lines as raw bytes (literals byte-exact).
    pub fn read_tagged_bytes(&mut self, tag: &str) -> Result<Vec<Vec<u8>>, String> {
        let prefix = format!("{tag} ");
        loop {
            let raw = self.read_line_bytes()?;
            if raw.starts_with(prefix.as_bytes()) {
                let rest = String::from_utf8_lossy(&raw[prefix.len()..]).into_owned();
                let untagged = std::mem::take(&mut self.pending);
                if rest.get(..2).is_some_and(|s| s.eq_ignore_ascii_case("OK")) {
                    let caps = parse_caps_code(&rest);
                    if !caps.is_empty() {
                        self.caps = caps;
                    }
                    return Ok(untagged);
                }
                return Err(rest);
            }
            self.pending.push(raw);
        }
    }

    /// Wait at most `wait` for the tagged response: `None` if it has not arrived yet (the command is still
    /// running, e.g. blocked on a lock), else the result as [`Self::read_tagged`].
    pub fn poll_tagged(
        &mut self,
        tag: &str,
        wait: Duration,
    ) -> Option<Result<Vec<String>, String>> {
        let saved = self.read_timeout;
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        self.read_timeout = Some(wait);
        let r = self.read_tagged(tag);
        self.stream.set_read_timeout(saved).unwrap();
        self.read_timeout = saved;
        match r {
            Err(e) if is_timeout(&e) => None,
            other => Some(other),
        }
    }

    /// Send `<tag> cmd` and wait for its completion.
    pub fn command(&mut self, cmd: &str) -> Result<Vec<String>, String> {
        let tag = self.send_raw(cmd);
        self.read_tagged(&tag)
    }

    /// SELECT; returns the EXISTS count.
    pub fn select(&mut self, mailbox: &str) -> Result<u32, String> {
        let lines = self.command(&format!("SELECT {}", imap_quote(mailbox)))?;
        Ok(last_exists(&lines).unwrap_or(0))
    }

    /// EXAMINE (read-only select); returns the EXISTS count.
    pub fn examine(&mut self, mailbox: &str) -> Result<u32, String> {
        let lines = self.command(&format!("EXAMINE {}", imap_quote(mailbox)))?;
        Ok(last_exists(&lines).unwrap_or(0))
    }

    /// CREATE a mailbox.
    pub fn create(&mut self, mailbox: &str) -> Result<(), String> {
        self.command(&format!("CREATE {}", imap_quote(mailbox)))
            .map(|_| ())
    }

    /// Wait for a `+` continuation; a tagged reply instead means the command failed (or ended).
    fn wait_continuation(&mut self, tag: &str) -> Result<(), String> {
        let prefix = format!("{tag} ");
        loop {
            let line = self.read_line_bytes()?;
            if line.starts_with(b"+") {
                return Ok(());
            }
            if line.starts_with(prefix.as_bytes()) {
                self.pending.clear();
                return Err(String::from_utf8_lossy(&line[prefix.len()..]).into_owned());
            }
            self.pending.push(line);
        }
    }

    /// APPEND one message with a synchronizing literal. `flags` like `"\\Seen $Work"` (may be empty).
    pub fn append(&mut self, mailbox: &str, flags: &str, msg: &[u8]) -> Result<(), String> {
        let fl = if flags.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.trim())
        };
        let tag = self.send_raw(&format!(
            "APPEND {}{} {{{}}}",
            imap_quote(mailbox),
            fl,
            msg.len()
        ));
        self.wait_continuation(&tag)?;
        let mut data = Vec::with_capacity(msg.len() + 2);
        data.extend_from_slice(msg);
        data.extend_from_slice(b"\r\n");
        self.write_all(&data);
        self.read_tagged(&tag).map(|_| ())
    }

    /// Append many `(flags, message)` pairs: MULTIAPPEND with non-synchronizing literals in batches when the
    /// server has `MULTIAPPEND` and `LITERAL+` (Dovecot does), else one [`Self::append`] each.
    pub fn append_many(&mut self, mailbox: &str, msgs: &[(&str, &[u8])]) -> Result<(), String> {
        if !(self.has_capability("MULTIAPPEND") && self.has_capability("LITERAL+")) {
            for (f, m) in msgs {
                self.append(mailbox, f, m)?;
            }
            return Ok(());
        }
        const BATCH_MSGS: usize = 500;
        const BATCH_BYTES: usize = 8 << 20;
        let mut i = 0;
        while i < msgs.len() {
            let tag = self.new_tag();
            let mut buf = format!("{tag} APPEND {}", imap_quote(mailbox)).into_bytes();
            let start = i;
            while i < msgs.len()
                && i - start < BATCH_MSGS
                && (i == start || buf.len() < BATCH_BYTES)
            {
                let (f, m) = msgs[i];
                if !f.trim().is_empty() {
                    buf.extend_from_slice(format!(" ({})", f.trim()).as_bytes());
                }
                buf.extend_from_slice(format!(" {{{}+}}\r\n", m.len()).as_bytes());
                buf.extend_from_slice(m);
                i += 1;
            }
            buf.extend_from_slice(b"\r\n");
            // One blocking write per batch. If the server stopped reading mid-batch (it does not for a
            // failing APPEND: Dovecot consumes the remaining literals), the 60 s write timeout panics.
            self.write_all(&buf);
            self.read_tagged(&tag)?;
        }
        Ok(())
    }

    /// `UID STORE uid_set op (flags)`; op is `+FLAGS`, `-FLAGS` or `FLAGS` (optionally `.SILENT`).
    pub fn uid_store(&mut self, uid_set: &str, op: &str, flags: &str) -> Result<(), String> {
        self.command(&format!("UID STORE {uid_set} {op} ({})", flags.trim()))
            .map(|_| ())
    }

    /// `UID MOVE` if advertised, else `UID COPY` + `\Deleted` + `UID EXPUNGE`.
    pub fn uid_move(&mut self, uid_set: &str, dest: &str) -> Result<(), String> {
        if self.has_capability("MOVE") {
            return self
                .command(&format!("UID MOVE {uid_set} {}", imap_quote(dest)))
                .map(|_| ());
        }
        self.uid_copy(uid_set, dest)?;
        self.uid_expunge(uid_set)
    }

    /// `UID COPY uid_set dest`.
    pub fn uid_copy(&mut self, uid_set: &str, dest: &str) -> Result<(), String> {
        self.command(&format!("UID COPY {uid_set} {}", imap_quote(dest)))
            .map(|_| ())
    }

    /// `UID STORE uid_set +FLAGS.SILENT (\Deleted)` then `UID EXPUNGE uid_set`.
    pub fn uid_expunge(&mut self, uid_set: &str) -> Result<(), String> {
        self.uid_store(uid_set, "+FLAGS.SILENT", "\\Deleted")?;
        self.command(&format!("UID EXPUNGE {uid_set}")).map(|_| ())
    }

    pub fn noop(&mut self) -> Result<(), String> {
        self.command("NOOP").map(|_| ())
    }

    /// `UID FETCH uid_set (UID FLAGS)` → `(uid, flags)` sorted by uid; flags sorted, space separated,
    /// `\Recent` removed (same normalization as `Dovecot::fetch_uid_flags`).
    pub fn uid_fetch_flags(&mut self, uid_set: &str) -> Result<Vec<(u32, String)>, String> {
        let lines = self.command(&format!("UID FETCH {uid_set} (UID FLAGS)"))?;
        let mut out = Vec::new();
        for l in &lines {
            if !l.starts_with("* ") || !l.contains(" FETCH (") {
                continue;
            }
            let uid = l.find("UID ").and_then(|p| {
                let digits: String = l[p + 4..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<u32>().ok()
            });
            let flags = l
                .find("FLAGS (")
                .and_then(|p| l[p + 7..].find(')').map(|e| &l[p + 7..p + 7 + e]));
            if let (Some(uid), Some(flags)) = (uid, flags) {
                out.push((uid, normalize_flags(flags)));
            }
        }
        out.sort();
        out.dedup_by_key(|(u, _)| *u);
        Ok(out)
    }

    /// `UID FETCH uid BODY.PEEK[]` → the raw message.
    pub fn uid_fetch_body(&mut self, uid: u32) -> Result<Vec<u8>, String> {
        let tag = self.send_raw(&format!("UID FETCH {uid} BODY.PEEK[]"));
        let lines = self.read_tagged_bytes(&tag)?;
        let uid_tok = format!("UID {uid}");
        for l in lines {
            let Some(p) = l.windows(8).position(|w| w == b"BODY[] {") else {
                continue;
            };
            let head = String::from_utf8_lossy(&l[..p]);
            if !head.contains(&uid_tok) && !String::from_utf8_lossy(&l).contains(&uid_tok) {
                continue;
            }
            let rest = &l[p + 8..];
            let close = rest
                .windows(3)
                .position(|w| w == b"}\r\n")
                .ok_or("malformed literal")?;
            let n: usize = std::str::from_utf8(&rest[..close])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad literal length")?;
            let body = &rest[close + 3..];
            if body.len() < n {
                return Err("short literal".to_string());
            }
            return Ok(body[..n].to_vec());
        }
        Err(format!("no BODY[] for uid {uid}"))
    }

    /// `UID SEARCH ALL` → UIDs ascending.
    pub fn uid_search_all(&mut self) -> Result<Vec<u32>, String> {
        let lines = self.command("UID SEARCH ALL")?;
        let mut uids: Vec<u32> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("* SEARCH"))
            .flat_map(|r| {
                r.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// LOGOUT (errors ignored) and close.
    pub fn logout(mut self) {
        self.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = self.command("LOGOUT");
    }
}

fn last_exists(lines: &[String]) -> Option<u32> {
    lines.iter().rev().find_map(|l| {
        let r = l.strip_prefix("* ")?;
        let (n, what) = r.split_once(' ')?;
        if what.eq_ignore_ascii_case("EXISTS") {
            n.parse().ok()
        } else {
            None
        }
    })
}

/// `[CAPABILITY a b c]` response code in a status line → capabilities (upper case).
fn parse_caps_code(line: &str) -> Vec<String> {
    let Some(p) = line.find("[CAPABILITY ") else {
        return Vec::new();
    };
    let rest = &line[p + 12..];
    let end = rest.find(']').unwrap_or(rest.len());
    rest[..end]
        .split_whitespace()
        .map(|s| s.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutf7() {
        assert_eq!(mutf7_encode("INBOX"), "INBOX");
        assert_eq!(mutf7_encode("A&B"), "A&-B");
        assert_eq!(mutf7_encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(mutf7_encode("日本語"), "&ZeVnLIqe-");
    }

    #[test]
    fn logical_lines() {
        let b = b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)\r\nA1 OK done\r\n";
        let (n, l) = parse_logical_line(b).unwrap();
        assert_eq!(l, b"* 1 FETCH (BODY[] {5}\r\nab\r\nc)");
        let (_, l2) = parse_logical_line(&b[n..]).unwrap();
        assert_eq!(l2, b"A1 OK done");
        assert_eq!(parse_logical_line(b"* 1 FETCH (BODY[] {5}\r\nab"), Err(28));
        assert_eq!(parse_logical_line(b"* OK partial"), Err(13));
    }
}
