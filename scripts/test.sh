#!/usr/bin/env bash
# Run the test suite against real daemon processes on loopback (CPU backend; GPU tests are
# skipped unless CUDA is present). Extra arguments go to pytest, e.g. scripts/test.sh -k amp
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$repo"
exec python -m pytest "$@"
