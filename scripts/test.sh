#!/usr/bin/env bash
# Runs every test: unit tests, the Dovecot 2.3 suite on this host and the Dovecot 2.4 suite
# in a Debian 13 root (built once and cached; MB_SKIP_D24=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)

# The plugin once, for every test that loads it into doveadm.
cargo build --lib --features doveadm-plugin --target-dir target/plugin-test
export MB_PLUGIN_SO="$PWD/target/plugin-test/debug/libmaildir_backup.so"

if [ "${MB_SKIP_D24:-}" != 1 ]; then
    MB_TRIXIE_ROOT=$(bash scripts/trixie-root.sh)
    export MB_TRIXIE_ROOT
fi

cargo test --no-fail-fast -- --test-threads="${MB_TEST_THREADS:-4}"
echo "tests took $(( $(date +%s) - start )) s"
