#!/usr/bin/env bash
# Runs every test: unit tests, the Dovecot 2.3 suite on this host, the Dovecot 2.4 suite
# in a Debian 13 root (built once by scripts/trixie-root.sh and cached), and both Debian
# packages (built here) installed into copies of pristine Debian 12 and 13 roots (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)

# The pristine roots the package tests install into: debootstrap downloads while cargo builds.
logs=$(mktemp -d /tmp/maildir-backup-test.XXXXXX)
bases=/var/cache/maildir-backup
bash scripts/debian-root.sh bookworm "$bases/bookworm-base" >"$logs/bookworm" 2>&1 &
bookworm_pid=$!
bash scripts/debian-root.sh trixie "$bases/trixie-base" >"$logs/trixie" 2>&1 &
trixie_pid=$!

# The plugin once, for every test that loads it into doveadm.
cargo build --lib --features doveadm-plugin --target-dir target/plugin-test
export MB_PLUGIN_SO="$PWD/target/plugin-test/debug/libmaildir_backup.so"

MB_TRIXIE_ROOT=$(bash scripts/trixie-root.sh)
export MB_TRIXIE_ROOT
# The same plugin built against the root's Dovecot 2.4 headers (and its settings module).
DOVECOT_CONFIG="$MB_TRIXIE_ROOT/usr/lib/dovecot/dovecot-config" \
    cargo build --lib --features doveadm-plugin --target-dir target/plugin24-test
export MB_PLUGIN24_SO="$PWD/target/plugin24-test/debug/libmaildir_backup.so"
export MB_SETTINGS24_SO="$PWD/target/plugin24-test/debug/libmaildir_backup_settings.so"

# Both packages (release builds), for tests/package.rs.
rm -rf target/deb
make deb
make deb DOVECOT_CONFIG="$MB_TRIXIE_ROOT/usr/lib/dovecot/dovecot-config"
MB_DEB12=$(ls target/deb/maildir-backup_*~deb12_*.deb)
MB_DEB13=$(ls target/deb/maildir-backup_*~deb13_*.deb)
export MB_DEB12 MB_DEB13
for suite in bookworm trixie; do
    pid_var=${suite}_pid
    if ! wait "${!pid_var}"; then
        cat "$logs/$suite" >&2
        exit 1
    fi
done
MB_BOOKWORM_BASE=$(tail -n1 "$logs/bookworm")
MB_TRIXIE_BASE=$(tail -n1 "$logs/trixie")
export MB_BOOKWORM_BASE MB_TRIXIE_BASE
rm -rf "$logs"

cargo test --no-fail-fast -- --test-threads="${MB_TEST_THREADS:-4}"
echo "tests took $(( $(date +%s) - start )) s"
