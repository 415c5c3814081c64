"""Seeded global RNGs: what timm's augmentations draw from, fixed per image or per batch and restored after.

timm's transforms, ``Mixup`` and ``RandomErasing`` draw from the global ``random``, ``numpy`` and
``torch`` generators; :func:`seeded` runs a block with them seeded and puts the previous states
back, so augmentation depends only on the seed it is given (see docs/recipes.md, "Exact resume").
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import torch

__all__ = ["seeded", "mix_seed"]


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the block with ``random``, ``numpy`` and ``torch`` (and ``device``'s CUDA RNG) seeded; restore after.

    Only the CPU generator (and ``device``'s, when it is a CUDA device) is touched:
    ``torch.manual_seed`` would also queue a lazy seeding of every CUDA device, which records a
    traceback each time (milliseconds per image in a loader worker).
    """
    import numpy

    seed = int(seed) % (2**63)
    py_state = random.getstate()
    np_state = numpy.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda = device if device is not None and device.type == "cuda" else None
    cuda_state = torch.cuda.get_rng_state(cuda) if cuda is not None else None
    try:
        random.seed(seed)
        numpy.random.seed(seed % (2**32))
        torch.default_generator.manual_seed(seed)
        if cuda is not None:
            torch.cuda.default_generators[cuda.index or 0].manual_seed(seed)
        yield
    finally:
        random.setstate(py_state)
        numpy.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda is not None and cuda_state is not None:  # both set together
            torch.cuda.set_rng_state(cuda_state, cuda)


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, rank, epoch, step, ...), the same on every platform."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63)
    return value
