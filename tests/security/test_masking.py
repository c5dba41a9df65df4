"""Secret values masked in a job's output as it is written, split across reads included."""

from __future__ import annotations

from meshgpu.runner.masking import Masker


def test_values_are_masked_whole_and_across_chunk_boundaries() -> None:
    m = Masker([b"hunter2-secret", b"abc"])  # under 4 bytes: never masked
    out = m.feed(b"token=hunter2-sec") + m.feed(b"ret done abc\nhunter") + m.feed(b"") + m.flush()
    assert out == b"token=*** done abc\nhunter"
    # Output that only looks like the start of a value is held back, then released.
    m = Masker([b"hunter2-secret"])
    assert m.feed(b"x hunt") == b"x "
    assert m.feed(b"ing\n") == b"hunting\n"
    assert Masker([]).feed(b"as is") == b"as is"
