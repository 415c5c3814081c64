"""--num-aug-repeats under a real two-rank torchrun (gloo, CPU): each rank reads its share of timm's RepeatAugSampler.

The golden ``soft_cls_loss`` package trains with timm's recipe on an ImageFolder of PNG and JPEG
files; a small launcher script records every ``(epoch key, index)`` the training loader reads on
its rank (scmc_runtime.data.EpochIndexed) and then runs the package's real train.py entry. The
test compares each rank's reads with what ``RepeatAugSampler`` gives that rank, and checks that
the repeats of an image are told apart (each copy is augmented with a seed of its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scmc_runtime.data import ResumableSampler
from tests.test_recipe import COMMON, golden, records, write_image_folder
from tests.train_support import kill_tree, python_env

pytest.importorskip("timm")
pytest.importorskip("PIL")
pytest.importorskip("sklearn")

SEED, REPEATS, STEPS, BATCH = 5, 3, 2, 8  # 2 ranks x 4 images a step
COPY_STRIDE = ResumableSampler.COPY_STRIDE

RECORDING_LAUNCHER = """
import json, os, sys
from scmc_runtime import data
from scmc_runtime.train import run_main

reads = []
read = data.EpochIndexed.__getitem__


def recording(self, key):
    reads.append([int(key[0]), int(key[1])])
    return read(self, key)


data.EpochIndexed.__getitem__ = recording
module = __import__(sys.argv[1] + ".train", fromlist=["main"])
try:
    run_main(lambda: module.main(sys.argv[3:]), module.PROG)
finally:
    with open(os.path.join(sys.argv[2], f"reads-{os.environ['RANK']}.json"), "w") as out:
        json.dump({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]), "reads": reads}, out)
"""


def expected_share(size: int, rank: int, epoch: int) -> list[tuple[int, int]]:
    """(copy, index) of what timm's RepeatAugSampler gives RANK of 2 in EPOCH (offset by the seed as scmc does)."""
    from timm.data.distributed_sampler import RepeatAugSampler

    sampler = RepeatAugSampler(range(size), num_replicas=2, rank=rank, shuffle=True, num_repeats=REPEATS)
    sampler.set_epoch(SEED * 100_003 + epoch)
    positions = range(rank, sampler.total_size, 2)
    return [((i % (size * REPEATS)) % REPEATS, index) for i, index in zip(positions, sampler)]


def test_two_ranks_read_their_repeat_aug_share_with_a_seed_per_copy_and_train(tmp_path: Path):
    images = write_image_folder(tmp_path / "images")
    package = golden("soft_cls_loss", tmp_path)
    out = tmp_path / "runs"
    out.mkdir()
    launcher = tmp_path / "recording_launcher.py"
    launcher.write_text(RECORDING_LAUNCHER)
    train_args = [
        *COMMON,
        "--out",
        str(out),
        "--cache-dir",
        str(out),
        "--data",
        str(images),
        "--data-pipeline",
        "timm",
        "--num-aug-repeats",
        str(REPEATS),
        "--label-smoothing",
        "0.1",
        "--seed",
        str(SEED),
        "--epochs",
        "1",
        "--max-steps",
        str(STEPS),
        "--workers",
        "0",
        "--run-name",
        "repeats",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    process = subprocess.Popen(
        [*torchrun, str(launcher), package.name, str(out), *train_args],
        env=python_env(package),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=420)
    finally:
        kill_tree(process, timeout=120)
    assert process.returncode == 0, output

    start = next(r for r in records(out / "repeats") if r["event"] == "start")
    assert start["world_size"] == 2 and start["batch_per_rank"] == BATCH // 2
    size = start["train_images"]
    assert size == 40
    epoch = [r for r in records(out / "repeats") if r["event"] == "epoch"][-1]
    assert epoch["val_ce_loss"] == epoch["val_ce_loss"]  # trained and validated: a number, not NaN

    per_rank = BATCH // 2 * STEPS
    seen = {}
    for rank in range(2):
        recorded = json.loads((out / f"reads-{rank}.json").read_text())
        assert recorded["rank"] == rank and recorded["world"] == 2
        reads = [(key // COPY_STRIDE, key % COPY_STRIDE, index) for key, index in recorded["reads"]]
        assert all(e == 0 for _, e, _ in reads)  # epoch 0
        assert [(copy, index) for copy, _, index in reads] == expected_share(size, rank, 0)[:per_rank]
        seen[rank] = {(copy, index) for copy, _, index in reads}
    # RepeatAugSampler deals the copies of an image out to the ranks in turn: the same image on both
    # ranks, as different copies, so each is augmented with its own seed (seed, epoch + copy * COPY_STRIDE, index).
    shared = {index for _, index in seen[0]} & {index for _, index in seen[1]}
    assert shared and not seen[0] & seen[1]
