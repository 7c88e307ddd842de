"""Rendered evaluation sets (session-scoped: rendered once) and the small golden model's flags.

Needs Debian's ``fluidsynth`` and ``fluid-soundfont-gm`` (installed by ``.ci/run``); the
rendered-audio tests are skipped, with the reason, where they are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import GOLDEN
from tools.testkit.render import can_render, drum_set, section_set, timbre_set, triad_set

#: The small random-weight golden model (3 blocks, 48 wide: hidden states 0-3), fp32.
MODEL_ARGS = ["--checkpoint", str(GOLDEN / "checkpoint.pt"), "--stats", str(GOLDEN / "stats.json"),
              "--model-config", str(GOLDEN / "config.json"), "--precision", "fp32"]  # fmt: skip
#: Fast probe settings for the tests (few epochs, fewer bootstrap resamples).
PROBE_ARGS = ["--max-epochs", "25", "--patience", "5", "--lr", "3e-3", "--bootstrap", "200", "--no-progress",
              "--decode-cpus", "1"]  # fmt: skip

needs_render = pytest.mark.skipif(
    not can_render(), reason="needs fluidsynth and /usr/share/sounds/sf2/FluidR3_GM.sf2"
)


@pytest.fixture(scope="session")
def render_root(tmp_path_factory) -> Path:
    if not can_render():
        pytest.skip("needs fluidsynth and the FluidR3_GM sound font")
    return tmp_path_factory.mktemp("rendered")


@pytest.fixture(scope="session")
def drums(render_root) -> Path:
    """12 drum pieces of 8 s at 80..168 BPM (beats with positions)."""
    drum_set(render_root / "drums", n=12)
    return render_root / "drums"


@pytest.fixture(scope="session")
def triads(render_root) -> Path:
    """12 triad progressions of 12 s in known keys (chords, key)."""
    triad_set(render_root / "triads", n=12)
    return render_root / "triads"


@pytest.fixture(scope="session")
def sections(render_root) -> Path:
    """6 pieces of three 8 s sections by different instruments."""
    section_set(render_root / "sections", n=6)
    return render_root / "sections"


@pytest.fixture(scope="session")
def timbre(render_root) -> tuple[Path, Path]:
    """(folder of 12 phrases of 5 s by 4 instruments, tags catalog CSV)."""
    _, cat = timbre_set(render_root / "timbre", n=12)
    return render_root / "timbre", cat
