#!/usr/bin/env bash
# The main job on an embedded default: a throwaway Dovecot on 127.0.0.1 with generated mail,
# IMAP clients changing it, and a consistent live backup of it (then verify, then Dovecot
# reads the backup). Nothing outside a temp dir is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet --bin maildir-backup
exec cargo run --release --quiet --example demo -- "$@"
