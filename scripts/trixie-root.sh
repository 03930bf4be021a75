#!/bin/bash
# Build (once) the Debian 13 "trixie" root with Dovecot 2.4 for the 2.4 integration tests
# (tests/support/trixie.rs), and print its path.
#
#   scripts/trixie-root.sh [ROOT]
#
# ROOT defaults to $MB_TRIXIE_ROOT, else /var/cache/maildir-backup/trixie. See scripts/debian-root.sh.
set -euo pipefail
exec bash "$(dirname "$0")/debian-root.sh" trixie "${1:-${MB_TRIXIE_ROOT:-/var/cache/maildir-backup/trixie}}" \
    dovecot-core,dovecot-imapd,dovecot-dev,dovecot-lmtpd
