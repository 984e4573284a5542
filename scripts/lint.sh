#!/usr/bin/env bash
# Lint and type-check (settings in pyproject.toml): ruff over the whole tree, mypy --strict over
# the wire (libremote_wire) and the daemon (libremote_server). Both must print no errors.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$repo"
ruff check .
mypy
