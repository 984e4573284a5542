#!/usr/bin/env bash
# Run the test suite against real daemon processes on loopback (CPU backend; GPU tests are
# skipped unless CUDA is present). Extra arguments go to pytest, e.g. scripts/test.sh -k amp
#
# Tests run in LIBREMOTE_TEST_WORKERS parallel pytest workers (pytest-xdist; default 2): most of
# the suite's time is daemons and client processes importing torch, one core each, so two
# workers finish in a little over half the time even on a 2-core machine. Pass -n 0 (or set
# LIBREMOTE_TEST_WORKERS=0) for one process, e.g. with --pdb.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
# Debian's prometheus and chromium for the metrics and dashboard tests (skipped, with the reason,
# where they cannot be installed; CI fails instead).
bash "$repo/scripts/system_packages.sh"
cd "$repo"
workers=(-n "${LIBREMOTE_TEST_WORKERS:-2}")
for arg in "$@"; do
    case "$arg" in -n|-n*|--numprocesses*|no:xdist) workers=() ;; esac
done
exec python -m pytest "${workers[@]}" "$@"
