#!/usr/bin/env bash
# The Debian packages the tests drive (tests/test_prometheus.py, tests/test_dashboard.py):
# prometheus (prometheus, promtool) and chromium with chromium-driver. Installs what is missing
# with apt-get (as root, or through sudo), running `apt-get update` once first. Where there is no
# apt-get it says so and goes on (those tests then skip, saying what to install); in CI (CI set)
# a tool still missing afterwards is an error, so a broken set-up never passes quietly.
set -euo pipefail
declare -A wanted=([prometheus]=prometheus [promtool]=prometheus [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for tool in "${!wanted[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${wanted[$tool]}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if command -v apt-get >/dev/null 2>&1; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "system_packages.sh: not root and no password-less sudo: install $packages yourself" >&2
            sudo=(false)
        fi
    fi
    if [ "${sudo[*]}" != "false" ]; then
        echo "system_packages.sh: installing $packages (apt-get)" >&2
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
    fi
else
    echo "system_packages.sh: no apt-get here: install $packages with this system's package manager;" \
         "the Prometheus and dashboard tests skip until then" >&2
fi
still=()
for tool in "${!wanted[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || still+=("$tool")
done
if [ ${#still[@]} -gt 0 ] && [ -n "${CI:-}" ]; then
    echo "system_packages.sh: still missing in CI: ${still[*]}" >&2
    exit 1
fi
exit 0
