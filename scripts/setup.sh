#!/usr/bin/env bash
# Installs what maildir-backup needs to build and test on Debian 12 or 13 (run as root).
set -euo pipefail

need_apt=()
# debhelper … systemd: `make deb` and the package tests (lintian, man, bash completion, systemd-analyze);
# restic, borgbackup, borgmatic: the hand-off tests; fuse3, python3-llfuse: their restores from `restic mount` / `borg mount`.
# time: GNU time, for the peak memory the benches print. curl: the HTTP API calls of the cluster tests.
for pkg in dovecot-core dovecot-imapd dovecot-lmtpd dovecot-dev libclang-dev clang rsync liblockfile-bin debootstrap util-linux \
    debhelper dpkg-dev fakeroot lintian man-db bash-completion systemd restic borgbackup borgmatic fuse3 python3-llfuse time curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: run as root to install: ${need_apt[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The system Dovecot is not needed (tests and the demo run their own): do not start it.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    # --no-install-recommends: some mail packages would pull in an MTA otherwise.
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install Rust 1.87 or newer (rustup), then run this again" >&2
    exit 1
fi
getent passwd vmail >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin --user-group vmail
echo "setup: ok ($(dovecot --version), $(cargo --version))"
