"""Augmented input under plans: every rank reads its box of the network's
input (the input layer split over samples, height, width, or height and
width) from one file with random resized crops and flips; the tiles put
together are bitwise the batch one process reads whole, for the same
(seed, epoch), at 2, 3 and 4 ranks."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hpcnn.data import HDF5Dataset, write_arrays
from hpcnn.data.augment import Augmentation
from hpcnn.models import build_model

from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import make_plan

pytestmark = pytest.mark.mpi

B, OUT = 6, 16


def _plans(g, P):
    return {"n": make_plan(g, P, "n", {"n": P}), "h": make_plan(g, P, "h", {"h": P}),
            "w": make_plan(g, P, "w", {"w": P}),
            "hw": make_plan(g, P, "hw", {"h": 2, "w": P // 2} if P % 2 == 0 else {"h": P}),
            "nh": make_plan(g, P, "nh", {"n": 2, "h": P // 2} if P % 2 == 0 else {"w": P})}


@pytest.mark.parametrize("kind", ["n", "h", "w", "hw", "nh"])
def test_tiles_of_augmented_input_equal_the_whole(kind):
    P, me = WORLD.Get_size(), WORLD.Get_rank()
    g = build_model("resnet_small", batch=B, image_size=OUT)
    plan = _plans(g, P)[kind]
    L = plan.layouts(g)[g.input_name]
    problems = []

    def run():
        d = tempfile.mkdtemp(prefix="hpcnn-test-augment-") if me == 0 else None
        d = WORLD.bcast(d, root=0)
        try:
            path = Path(d) / "img.h5"
            if me == 0:
                rng = np.random.default_rng(5)
                write_arrays(path, {"train": (rng.integers(0, 256, size=(20, 3, 23, 19), dtype=np.uint8),
                                              rng.integers(0, 10, size=20))}, num_classes=10)
            WORLD.Barrier()
            aug = Augmentation(size=OUT, random_resized_crop=True, scale=(0.3, 1.0), flip=True, seed=11)
            with HDF5Dataset(path, "train", batch_size=B, seed=2, transform=aug) as ds:
                for epoch, index in ((0, 0), (4, 2)):
                    box = L.box(me)
                    tile = ds.read(epoch, index, box)[0] if box is not None else None
                    tiles = WORLD.gather((None if box is None else tuple(box), tile), root=0)
                    if me == 0:
                        whole, _ = ds.read(epoch, index)       # one process, the whole batch
                        got = np.full_like(whole, np.nan)
                        for b, t in tiles:
                            if b is not None:
                                got[tuple(slice(lo, hi) for lo, hi in b)] = t
                        if not np.array_equal(got, whole):
                            problems.append(f"epoch {epoch} batch {index}: the tiles differ from the whole")
        finally:
            WORLD.Barrier()
            if me == 0:
                shutil.rmtree(d, ignore_errors=True)

    run_or_abort(run)
    agree(problems, f"augmented input under a {kind} split of the input at {P} ranks")
