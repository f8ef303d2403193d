"""Faults while writing: a full disk (a real small tmpfs) and kill -9 in the middle of saves.

Whatever happens, the file under the final name is the old one or the new one, whole;
no temporary is left for long, and the error is one line naming the file.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_hostile import check_refused, snapshot

ROOT = Path(__file__).resolve().parents[1]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, so a write can really hit ENOSPC (needs root with CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                               capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small disk to fill")
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip()}); the full-disk "
                    "test needs root with CAP_SYS_ADMIN")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` to ENOSPC, then free ``leave`` bytes."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    if leave:
        with open(disk / "filler", "r+b") as f:
            f.truncate((disk / "filler").stat().st_size - leave)


def test_full_disk_keeps_the_checkpoint_the_model_and_the_grid(small_disk, trained_run,
                                                               tiny_onnx):
    run = small_disk / "run"
    run.mkdir()
    shutil.copy(trained_run / "ckpt.pt", run / "ckpt.pt")
    shutil.copy(tiny_onnx, small_disk / "model.onnx")
    (small_disk / "s.png").write_bytes(b"an earlier grid")
    fill(small_disk, leave=64 * 1024)  # room for a log line, not for a checkpoint
    before = {k: v for k, v in snapshot(small_disk).items() if k != "filler"}

    def refused(cmd, culprit):
        proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        check_refused(cmd, culprit, proc.returncode, proc.stderr)
        assert "no space left" in proc.stderr and "inline_container" not in proc.stderr
        return proc.stderr

    # Training one more step, then the checkpoint save hits the full disk.
    refused(["training/train.py", "--out", run, "--resume", "--steps", "301", "--no-progress"],
            run / "ckpt.pt")
    fill(small_disk)  # now not even room for a small PNG grid
    refused(["-m", "runtime", "sample", small_disk / "model.onnx", "-n", "64", "--steps", "2",
             "--no-progress", "-o", small_disk / "s.png"], small_disk / "s.png")
    # Refused before the trace: the weights alone do not fit.
    assert "for the model's weights" in refused(
        ["export/to_onnx.py", run / "ckpt.pt", "-o", small_disk / "model.onnx"],
        small_disk / "model.onnx")
    after = snapshot(small_disk)
    assert {k: after.get(k) for k in before} == before  # checkpoint, model and grid intact
    assert temporaries(small_disk) == []

    from training.checkpoint import load_checkpoint

    assert load_checkpoint(run / "ckpt.pt", resume=True)["step"] == 300


CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from training.checkpoint import save_checkpoint
ckpt = torch.load({src!r}, weights_only=True)
ckpt["pad"] = torch.zeros(4_000_000)  # 16 MB: a save takes long enough to be cut
print("ready", flush=True)
for step in range(1, 10**6):
    ckpt["step"] = step
    save_checkpoint({dst!r}, ckpt)
"""


@pytest.mark.parametrize("run", range(3))
def test_kill_9_during_saves_leaves_a_whole_checkpoint(run, trained_run, tmp_path):
    import torch

    from training.checkpoint import save_checkpoint

    dst = tmp_path / "ckpt.pt"
    shutil.copy(trained_run / "ckpt.pt", dst)
    code = CHILD.format(root=str(ROOT), src=str(dst), dst=str(dst))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(random.Random(run).uniform(0.05, 0.6))  # a random moment of the save loop
    child.kill()
    child.wait()
    ckpt = torch.load(dst, weights_only=True)  # old or new, never half of one
    assert ckpt["step"] == 300 or ("pad" in ckpt and ckpt["step"] >= 1)
    # Temporaries of the killed process (if it died mid-save) go with the next save.
    ckpt["step"] = -1
    save_checkpoint(dst, ckpt)
    assert temporaries(tmp_path) == []
    assert torch.load(dst, weights_only=True)["step"] == -1


def test_a_sample_that_fills_the_disk_replaces_none_of_its_outputs(small_disk, tiny_onnx):
    """The grid, the npz and the --each PNGs are one set: all new, or all as they were."""
    each = small_disk / "each"
    each.mkdir()
    for path in (small_disk / "keep.png", small_disk / "a.npz", each / "00000.png"):
        path.write_bytes(b"an earlier output")
    fill(small_disk, leave=64 * 1024)  # room for the grid and the npz, not for 100 PNGs
    before = {k: v for k, v in snapshot(small_disk).items() if k != "filler"}
    cmd = ["-m", "runtime", "sample", tiny_onnx, "-n", "100", "--steps", "2", "--no-progress",
           "-o", small_disk / "keep.png", "--npz", small_disk / "a.npz", "--each", each]
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    check_refused(cmd, each, proc.returncode, proc.stderr)
    assert "no space left" in proc.stderr
    after = {k: v for k, v in snapshot(small_disk).items() if k != "filler"}
    assert after == before
    assert temporaries(small_disk) == []
