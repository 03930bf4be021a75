#!/usr/bin/env bash
# Runs every test: unit tests, the Dovecot 2.3 suite on this host and the Dovecot 2.4 suite
# in a Debian 13 root (built once by scripts/trixie-root.sh and cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)

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

cargo test --no-fail-fast -- --test-threads="${MB_TEST_THREADS:-4}"
echo "tests took $(( $(date +%s) - start )) s"
