"""The small shared helpers: atomic_write (mode from the umask, nothing left behind), plain progress lines, checks."""

import io
import os
import stat

import pytest

from sashimi.checks import check_int, check_number
from sashimi.files import atomic_write, write_json
from sashimi.progress import PlainProgress, progress


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", b"data")
        write_json(tmp_path / "b.json", {"x": 1})
        atomic_write(tmp_path / "c.bin", lambda f: f.write(b"streamed"))
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json", "c.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask
    assert (tmp_path / "c.bin").read_bytes() == b"streamed" and (tmp_path / "b.json").read_text() == '{\n  "x": 1\n}\n'


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "keep.txt"
    atomic_write(path, b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.txt"]


def test_plain_progress_prints_a_line_every_few_seconds_not_per_update():
    out = io.StringIO()
    bar = PlainProgress(total=1000, desc="train", every=3600, file=out)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(bits="5.000")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 1000/1000 bits=5.000")
    out = io.StringIO()
    bar = PlainProgress(total=3, desc="eval", every=0, file=out)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) == 3  # every=0: a line per update, none repeated on close


def test_progress_is_plain_when_stderr_is_not_a_terminal(capsys):
    bar = progress(total=2, desc="x")
    assert isinstance(bar, PlainProgress)  # pytest's captured stderr is not a terminal
    silent = progress(range(3), disable=True)
    assert list(silent) == [0, 1, 2]


def test_checks_name_the_setting():
    assert check_int("n", 3, 1) == 3 and check_int("n", None, 1, allow_none=True) is None
    for bad in (0, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            check_int("n", bad, 1)
    with pytest.raises(ValueError, match=r"top_p must be a finite number > 0 and <= 1"):
        check_number("top_p", 0.0, 0, 1, low_open=True)
    with pytest.raises(ValueError, match="seconds"):
        check_number("seconds", float("inf"), 0)
