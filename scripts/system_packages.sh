#!/usr/bin/env bash
# The Debian packages some tests drive (scripts/install.sh runs this):
#   chromium            the browser tests (tests/web/, Playwright with executable_path, never
#                       `playwright install`)
#   fluidsynth          MIDI rendering for the evaluation tests, with
#   fluid-soundfont-gm  its General MIDI sound font
# Installs the missing ones with apt-get when run as root; otherwise prints one line saying what
# to run, and exits 0 (the Python install does not depend on them).
# MUSICFM_APT=never: never run apt-get (only say what is missing).
set -euo pipefail
CHROMIUM=${MUSICFM_CHROMIUM:-/usr/bin/chromium}
FLUIDSYNTH=${MUSICFM_FLUIDSYNTH:-/usr/bin/fluidsynth}
SOUNDFONT=${MUSICFM_SOUNDFONT:-/usr/share/sounds/sf2/FluidR3_GM.sf2}
missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium)
[ -x "$FLUIDSYNTH" ] || missing+=(fluidsynth)
[ -f "$SOUNDFONT" ] || missing+=(fluid-soundfont-gm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "${MUSICFM_APT:-auto}" != never ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing ${missing[*]} (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi
echo "install.sh: the browser and MIDI tests need Debian packages; run: sudo apt-get install -y ${missing[*]}" >&2
