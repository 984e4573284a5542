#!/usr/bin/env bash
# The main job: start a libremote daemon on this machine (CPU backend unless --device says
# otherwise) and train a model through it from a client, then run an unmodified PyTorch script
# through the LIBREMOTE_SERVER opt-in. Arguments go to examples/demo.py (--device, --steps).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$repo"
exec python examples/demo.py "$@"
