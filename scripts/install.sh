#!/usr/bin/env bash
# Creates .venv and installs torch (CPU wheel) first, then the project with its dev extras, and
# the Debian packages the tests drive (chromium, fluidsynth, fluid-soundfont-gm) when missing:
# with apt-get as root, otherwise one line saying what to run (scripts/system_packages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]' -c constraints.txt
bash scripts/system_packages.sh
