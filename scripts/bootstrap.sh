#!/usr/bin/env bash
# Make .venv with the pinned dependencies and this checkout installed (idempotent, fast when
# nothing changed). Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LIBREMOTE_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.requirements.sha"
wanted="$(sha256sum "$repo/requirements-dev.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r "$repo/requirements-dev.txt"
    echo "$wanted" > "$stamp"
fi
# A regular (not editable) install: it also places the LIBREMOTE_SERVER startup hook (.pth).
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$repo" >/dev/null
export PATH="$venv/bin:$PATH"
