#!/usr/bin/env bash
# Runs the whole suite N times in a row on this machine (default 5) and reports each run;
# a suite that fails one run in ten has a bug. Not part of CI (it takes N times as long).
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
if ! [[ $runs =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [RUNS]" >&2
    exit 64
fi
logs=$(mktemp -d /tmp/maildir-backup-stress.XXXXXX)
failed=0
for i in $(seq "$runs"); do
    start=$(date +%s)
    if bash scripts/test.sh >"$logs/run$i.log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed=$((failed + 1))
        grep -E "^test .* FAILED|panicked at|^failures:" "$logs/run$i.log" | head -20 | sed 's/^/    /'
    fi
    echo "run $i/$runs: $result in $(( $(date +%s) - start )) s (log: $logs/run$i.log)"
done
echo "$((runs - failed)) of $runs runs green"
[ "$failed" -eq 0 ]
