"""Object versions (:func:`pipeline.io.objects.object_versions`) when a prefix cannot be listed:
its objects fall back to one HEAD each, or are handed back unlisted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io.objects import content_version, object_versions


@pytest.mark.parametrize("threads", [1, 4])
def test_a_prefix_that_cannot_be_listed_falls_back_to_heads(tmp_path: Path, threads: int) -> None:
    (tmp_path / "ok").mkdir()
    present = [tmp_path / "ok" / f"{i}.wav" for i in range(3)]
    for i, f in enumerate(present):
        f.write_bytes(b"x" * (i + 1))
    gone = [str(tmp_path / "gone" / f"{i}.wav") for i in range(2)]  # the listing itself fails
    got = object_versions([str(f) for f in present] + gone, min_per_prefix=2, threads=threads)
    # one listing of ok/, one failed listing of gone/, then one HEAD per object of gone/
    assert (got.prefixes, got.lists, got.heads) == (1, 2, 2)
    assert got.versions == {str(f): content_version(str(f)) for f in present}
    assert sorted(got.errors) == gone
    assert all(kind == "FetchError" and "not found" in msg for kind, msg in got.errors.values())
    assert got.unlisted == []


def test_without_heads_the_unlisted_objects_are_handed_back(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    lone = tmp_path / "a" / "x.wav"
    lone.write_bytes(b"abc")
    gone = [str(tmp_path / "gone" / f"{i}.wav") for i in range(2)]
    got = object_versions([str(lone), *gone], min_per_prefix=2, head=False)
    # a/ holds one wanted object (below min_per_prefix): not listed; gone/ fails to list
    assert got.heads == 0 and got.versions == {} and got.errors == {}
    assert sorted(got.unlisted) == sorted([str(lone), *gone])
    assert got.requests == got.lists == 1
