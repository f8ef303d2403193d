"""The one output-writing path: checked before work, atomic, never onto an input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runtime.util.fileio import (
    OutputError,
    atomic_output,
    atomic_outputs,
    check_output,
    remove_stale_temporaries,
    temporary_path,
    write_bytes,
)


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="no file"), atomic_output(target):
        pass
    assert not target.exists()


def test_check_output_refuses_inputs_folders_and_unwritable_places(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    with pytest.raises(OutputError, match="also an input"):
        check_output(model, inputs=[model], option="-o")
    with pytest.raises(OutputError, match="also an input"):
        check_output(tmp_path / "sub" / ".." / "m.onnx", inputs=[model], option="-o")
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, option="-o")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    for under_a_file in (blocker / "x.png", blocker / "sub" / "x.png"):
        with pytest.raises(OutputError, match=f"{blocker} is a file, not a folder"):
            check_output(under_a_file, option="-o")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_output(locked / "x.png", option="-o")
    assert model.read_bytes() == b"model"
    assert check_output(tmp_path / "new" / "x.png") == tmp_path / "new" / "x.png"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "ckpt.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = target.with_name(f".{target.name}.{dead_pid}.abc{'.tmp'}")
    stale.write_bytes(b"x" * 100)
    mine = temporary_path(target)
    mine.write_bytes(b"live")
    other = tmp_path / ".other.pt.1.abc.tmp"
    other.write_bytes(b"")
    assert remove_stale_temporaries(target) == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


def test_the_longest_legal_name_can_be_written(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for name in ("d" * (limit - 4) + ".png", "é" * ((limit - 4) // 2) + ".png"):
        target = tmp_path / name
        check_output(target, option="-o")
        write_bytes(target, b"grid")
        assert target.read_bytes() == b"grid"
        assert len(os.fsencode(temporary_path(target).name)) <= limit
    assert len(list(tmp_path.iterdir())) == 2  # no temporary left


def test_a_set_of_outputs_is_replaced_all_or_nothing(tmp_path):
    targets = [tmp_path / "grid.png", tmp_path / "each" / "00000.png", tmp_path / "a.npz"]
    for path in targets:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_outputs() as outputs:
        for path in targets[:-1]:
            outputs.write_bytes(path, b"new")
        outputs.add(targets[-1])
        raise RuntimeError("the last writer failed")
    assert [p.read_bytes() for p in targets] == [b"old"] * 3
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(OutputError, match="written twice"), atomic_outputs() as outputs:
        outputs.write_bytes(targets[0], b"new")
        outputs.write_bytes(targets[0], b"newer")
    assert targets[0].read_bytes() == b"old"
    with atomic_outputs() as outputs:
        for path in targets:
            outputs.write_bytes(path, b"new")
    assert [p.read_bytes() for p in targets] == [b"new"] * 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_every_member_is_checked_before_the_first_rename(tmp_path):
    """A later member whose target became a folder fails the set before any old file is
    replaced (the rename of the first members used to happen already)."""
    targets = [tmp_path / "grid.png", tmp_path / "a.npz", tmp_path / "each" / "00001.png"]
    for path in targets[:2]:
        path.write_bytes(b"old")
    targets[2].mkdir(parents=True)
    with pytest.raises(OutputError, match="00001.png.*is a folder"), \
            atomic_outputs() as outputs:
        for path in targets:
            outputs.write_bytes(path, b"new")
    assert [p.read_bytes() for p in targets[:2]] == [b"old"] * 2
    assert targets[2].is_dir() and not list(tmp_path.rglob("*.tmp"))


def test_names_too_long_are_one_line_naming_the_option(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long_name = tmp_path / ("n" * (limit + 1 - 4) + ".png")
    long_path = tmp_path / "/".join(["d" * 200] * 21) / "x.png"
    for path in (long_name, long_path):
        with pytest.raises(OutputError, match="^--npz.*too long"):
            check_output(path, option="--npz")
    assert list(tmp_path.iterdir()) == []
