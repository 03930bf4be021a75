#!/bin/bash
# Build (once) a Debian root with debootstrap, and print its path: the Debian 13 root Dovecot 2.4 runs
# in for the 2.4 tests (scripts/trixie-root.sh), and the pristine Debian 12 and 13 roots the package
# tests install into (copies of them).
#
#   scripts/debian-root.sh SUITE ROOT [PACKAGES]
#
# PACKAGES (comma-separated) are installed on top of minbase. Needs root, debootstrap and network
# access to a Debian mirror. The mirror is read from the host's apt sources (deb822 *.sources or
# one-line *.list); $MB_DEBIAN_MIRROR overrides it.
#
# - Idempotent: a complete root carries the stamp file ROOT/.maildir-backup-SUITE-root; when it is present
#   (and records the same package set) nothing is done. The root is built in ROOT.partial and renamed to ROOT
#   only when complete, so a run that was interrupted leaves at most ROOT.partial (or, from older layouts,
#   an unstamped ROOT); both are detected and rebuilt from scratch.
# - Concurrency-safe: builders serialize on flock(ROOT.lock); a caller that finds the stamp needs no lock.
# - Never leaves anything mounted that it mounted: debootstrap mounts proc/sys inside the tree while it
#   runs, and the exit trap unmounts whatever is still mounted below ROOT.partial. A mount below a
#   complete ROOT (the test harness mounts ROOT/proc for its own use) is left alone, except when an
#   unstamped ROOT is about to be deleted.
# - Creates the system user/group `vmail` inside the root (using the host's vmail uid/gid when the host
#   has one and they are free in the root, so files look the same from both sides).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: debian-root.sh SUITE ROOT [PACKAGES]" >&2
    exit 2
fi
SUITE=$1
PACKAGES=${3:-}
STAMP_NAME=.maildir-backup-$SUITE-root
# Bump when the content of a root changes in a way older roots lack.
STAMP_VERSION=2

ROOT=$2
case "$ROOT" in
    /*) ;;
    *) ROOT=$PWD/$ROOT ;;
esac
ROOT=${ROOT%/}
if [ -z "$ROOT" ] || [ "$ROOT" = / ]; then
    echo "trixie-root.sh: refusing to use '/' as the root" >&2
    exit 2
fi
STAMP=$ROOT/$STAMP_NAME
WANT_STAMP="version=$STAMP_VERSION suite=$SUITE packages=$PACKAGES"

log() { echo "debian-root.sh: $*" >&2; }

stamp_ok() {
    [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP" 2>/dev/null)" = "$WANT_STAMP" ]
}

# Fast path: a complete root (the stamp is written before the final rename, so it is never seen half-done).
if stamp_ok; then
    echo "$ROOT"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "must run as root (debootstrap, chroot)"
    exit 1
fi

# Unmount everything mounted at or below $1 (deepest first). Mount points in /proc/mounts escape
# space/tab/newline/backslash as octal.
umount_below() {
    local base=$1 mp
    [ -e "$base" ] || return 0
    base=$(readlink -f "$base")
    awk '{print $2}' /proc/mounts | while read -r mp; do
        mp=$(printf '%b' "$mp")
        case "$mp" in
            "$base" | "$base"/*) echo "$mp" ;;
        esac
    done | sort -r | while read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" || log "warning: cannot unmount $mp"
    done
}

# Remove a tree that may contain mounts; never crosses into another file system.
remove_tree() {
    local t=$1
    [ -e "$t" ] || return 0
    umount_below "$t"
    rm -rf --one-file-system -- "$t"
}

debian_mirror() {
    if [ -n "${MB_DEBIAN_MIRROR:-}" ]; then
        echo "${MB_DEBIAN_MIRROR%/}"
        return
    fi
    local codename
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    # deb822: stanzas separated by blank lines; take URIs of a "Types: deb" stanza for the main suite
    # (not -security/-updates). Prefer the stanza that lists the host's own codename.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v want="$codename" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && uris != "" && uris !~ /security/) {
                    split(uris, u, " ")
                    if (want != "" && (" " suites " ") ~ (" " want " ")) { print "1 " u[1] }
                    else if (suites !~ /-security/) { print "2 " u[1] }
                }
                types = ""; uris = ""; suites = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"  { $1 = ""; types = $0 }
            tolower($1) == "uris:"   { $1 = ""; uris = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            END { flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [options] URI suite components...
        awk -v want="$codename" '
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                uri = $i; suite = $(i + 1)
                if (uri ~ /security/) next
                if (want != "" && suite == want) print "1 " uri; else print "3 " uri
            }' "$f"
    done
} 2>/dev/null

pick_mirror() {
    local m
    if [ -n "${MB_DEBIAN_MIRROR:-}" ]; then
        m=${MB_DEBIAN_MIRROR%/}
    else
        m=$(debian_mirror | sort -s -k1,1n | head -n1 | cut -d' ' -f2-)
        m=${m%/}
    fi
    if [ -z "$m" ]; then
        log "cannot find a Debian mirror in /etc/apt/sources.list{,.d/*}; set MB_DEBIAN_MIRROR"
        exit 1
    fi
    echo "$m"
}

mkdir -p "$(dirname "$ROOT")"
LOCK=$ROOT.lock
exec 9>>"$LOCK"
if ! flock -n 9; then
    log "waiting for another build of $ROOT (lock $LOCK)"
    flock 9
fi

# Re-check under the lock: another process may have finished the build while we waited.
if stamp_ok; then
    echo "$ROOT"
    exit 0
fi

PARTIAL=$ROOT.partial
DEBOOTSTRAP_PID=
cleanup() {
    local rc=$?
    if [ -n "$DEBOOTSTRAP_PID" ]; then
        kill -TERM -- "-$DEBOOTSTRAP_PID" 2>/dev/null || true
        wait "$DEBOOTSTRAP_PID" 2>/dev/null || true
    fi
    umount_below "$PARTIAL"
    if [ $rc -ne 0 ]; then
        log "build failed (exit $rc); $PARTIAL is left for inspection and will be rebuilt next time"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [ -e "$ROOT" ]; then
    log "$ROOT exists but is not complete (no valid $STAMP_NAME); rebuilding"
    remove_tree "$ROOT"
fi
if [ -e "$PARTIAL" ]; then
    log "removing the half-built $PARTIAL of an interrupted run"
    remove_tree "$PARTIAL"
fi

for tool in debootstrap chroot; do
    command -v "$tool" >/dev/null || {
        log "$tool not found (apt-get install -y debootstrap)"
        exit 1
    }
done

MIRROR=$(pick_mirror)
log "building Debian $SUITE in $PARTIAL from $MIRROR (packages: $PACKAGES)"
start=$(date +%s)
mkdir -p "$PARTIAL"
DEBOOTSTRAP_LOG=$(dirname "$ROOT")/$(basename "$ROOT").debootstrap.log
# debootstrap runs in its own process group, in the background, so that a SIGINT/SIGTERM to this script
# interrupts `wait` at once; the trap then stops that process group and unmounts what debootstrap mounted.
# It inherits the lock fd on purpose: if this script is SIGKILLed, the orphaned debootstrap keeps the lock
# until it ends, so the next run cannot delete ROOT.partial under it (it waits, then rebuilds).
setsid debootstrap --variant=minbase ${PACKAGES:+--include="$PACKAGES"} "$SUITE" "$PARTIAL" "$MIRROR" \
    >"$DEBOOTSTRAP_LOG" 2>&1 </dev/null &
DEBOOTSTRAP_PID=$!
rc=0
wait "$DEBOOTSTRAP_PID" || rc=$?
DEBOOTSTRAP_PID=
if [ $rc -ne 0 ]; then
    tail -n 30 "$DEBOOTSTRAP_LOG" >&2
    [ -f "$PARTIAL/debootstrap/debootstrap.log" ] && tail -n 30 "$PARTIAL/debootstrap/debootstrap.log" >&2
    log "debootstrap failed; full log in $DEBOOTSTRAP_LOG"
    exit 1
fi
umount_below "$PARTIAL"

# No init system in a chroot; make sure no package maintainer script ever starts a daemon in it.
printf '#!/bin/sh\nexit 101\n' >"$PARTIAL/usr/sbin/policy-rc.d"
chmod 755 "$PARTIAL/usr/sbin/policy-rc.d"

# vmail system user inside the root.
if ! chroot "$PARTIAL" getent passwd vmail >/dev/null; then
    idargs=()
    if host=$(getent passwd vmail); then
        huid=$(echo "$host" | cut -d: -f3)
        hgid=$(echo "$host" | cut -d: -f4)
        if ! chroot "$PARTIAL" getent passwd "$huid" >/dev/null &&
            ! chroot "$PARTIAL" getent group "$hgid" >/dev/null; then
            chroot "$PARTIAL" groupadd --system --gid "$hgid" vmail
            idargs=(--uid "$huid" --gid "$hgid")
        fi
    fi
    if [ ${#idargs[@]} -eq 0 ]; then
        idargs=(--user-group)
    fi
    chroot "$PARTIAL" useradd --system --no-create-home --shell /usr/sbin/nologin "${idargs[@]}" vmail
fi
mkdir -p "$PARTIAL/srv"
chmod 755 "$PARTIAL/srv"
# minbase has no /etc/mtab; doveconf/doveadm read it (setmntent) and log an error without it.
[ -e "$PARTIAL/etc/mtab" ] || ln -s ../proc/self/mounts "$PARTIAL/etc/mtab"

if [[ ",$PACKAGES," == *,dovecot-core,* ]]; then
    for f in usr/sbin/dovecot usr/bin/doveadm usr/lib/dovecot/dovecot-lda; do
        [ -x "$PARTIAL/$f" ] || {
            log "$f missing in the new root"
            exit 1
        }
    done
fi
version=$(chroot "$PARTIAL" dovecot --version 2>/dev/null || echo none)
secs=$(($(date +%s) - start))
{
    echo "$WANT_STAMP"
    echo "dovecot=$version"
    echo "mirror=$MIRROR"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$secs"
} >"$PARTIAL/$STAMP_NAME.tmp"
mv "$PARTIAL/$STAMP_NAME.tmp" "$PARTIAL/$STAMP_NAME"
sync -f "$PARTIAL/$STAMP_NAME" 2>/dev/null || true
mv -T "$PARTIAL" "$ROOT"
log "built $ROOT (Dovecot $version) in ${secs}s, $(du -sh --one-file-system "$ROOT" | cut -f1)"
echo "$ROOT"
