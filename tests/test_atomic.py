"""Atomic writes: nothing complete-looking after a failure; leftovers of a kill are cleaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from glm.atomic import atomic_dir, remove_stale_temps, write_json_atomic


def test_a_failed_build_leaves_no_directory(tmp_path):
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.arrow").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_build_leaves_a_temp_dir_that_is_removed_later(tmp_path):
    out = tmp_path / "stage"
    code = textwrap.dedent(
        f"""
        import os, signal
        from glm.atomic import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "half.arrow").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".stage.")

    (tmp_path / "other").mkdir()  # another stage's output is never touched
    (tmp_path / ".stagefoo.x.tmp").mkdir()  # nor a temp dir of a different output name
    assert remove_stale_temps(out) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stagefoo.x.tmp", "other"]

    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "stats.json", {"ok": True})
    assert (out / "stats.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".stage.")]


def test_outputs_are_readable_by_others_as_with_a_plain_open(tmp_path):
    # a serving account must be able to read what the pipeline wrote (umask 022 here)
    from glm.atomic import atomic_dir, write_bytes_atomic

    previous = os.umask(0o022)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
        write_bytes_atomic(tmp_path / "atomic", b"x")
        with atomic_dir(tmp_path / "stage") as tmp:
            (tmp / "inside").write_bytes(b"x")
    finally:
        os.umask(previous)
    mode = plain.stat().st_mode & 0o777
    assert (tmp_path / "atomic").stat().st_mode & 0o777 == mode
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o755
