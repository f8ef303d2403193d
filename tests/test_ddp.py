"""DistributedDataParallel through torchrun: 2 CPU processes, gloo, a few steps.

Run as a file, this module is the worker each rank executes; pytest runs the launcher.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _worker(out: Path) -> None:
    """One rank: train a tiny net, then dump what this rank holds for the test to compare."""
    sys.path.insert(0, str(ROOT))
    import torch

    from training.config import ModelConfig, TrainConfig
    from training.data import load_dataset
    from training.trainer import train

    model_config = ModelConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2),
                               num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
                               num_groups=4)
    train_config = TrainConfig(lr=2e-3, warmup=2, batch_size=32, steps=STEPS, ema_decay=0.9,
                               hflip=True, sample_every=0, save_every=2, log_every=1,
                               preview_count=4, preview_steps=5)
    trainer = train(model_config, train_config, load_dataset("digits", 8, 1), out / "run",
                    device="cpu", progress=False)
    x0, t, noise = trainer.batch(0)
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                "x0": x0, "t": t, "noise": noise, "local_batch": trainer.local_batch},
               out / f"rank{trainer.info.rank}.pt")


def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    import torch

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(Path(__file__).resolve()), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Each rank took half of the global batch, from its own shard, with its own noise.
    assert ranks[0]["local_batch"] == ranks[1]["local_batch"] == 16
    assert not torch.equal(ranks[0]["x0"], ranks[1]["x0"])
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])

    # Gradients were averaged, so both ranks hold the same weights, and they did train.
    for part in ("model", "ema"):
        for name, tensor in ranks[0][part].items():
            assert torch.equal(tensor, ranks[1][part][name]), f"{part}.{name} differs"
    assert torch.count_nonzero(ranks[0]["model"]["conv_out.weight"]) > 0  # zero-init moved

    # Only rank 0 wrote the run's files: one log record per step, one checkpoint.
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2
    for name, tensor in ckpt["model"].items():
        assert torch.equal(tensor, ranks[0]["model"][name])
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "log.jsonl",
                                                     f"samples_{STEPS:07d}.png"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
