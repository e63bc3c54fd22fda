"""A training seed for nnU-Net runs, and the random state that ``--c`` carries on.

nnU-Net fixes no seed: its augmentation workers seed themselves from the operating system, and its
NonDet augmenter hands out whichever worker's batch is ready first. A seeded run (``run.seed`` >= 0)
seeds this process and runs its loaders in worker processes with seeds of their own whose batches
come back in a fixed order (batchgenerators' ``MultiThreadedAugmenter``).
"""
import random
from enum import Enum
from typing import Optional

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter


# The seed stream of each loader's workers is fixed by what the loader serves, so that a run draws the same
# batches whichever other loaders it builds: a method and its ...SelfTraining variant share their pretraining,
# and a resumed run, which builds only the loaders of the stages left, draws what the uninterrupted one would.
# nnU-Net's train and validation loaders are 0 and 1, the unlabelled images 2, each stage's own loader after.
UNLABELED_STREAM = 2


def stage_stream(data: Enum) -> int:
    """The seed stream of the stage loader that serves ``data`` (a ``training.schedule.Data``)."""
    return UNLABELED_STREAM + 1 + list(type(data)).index(data)


def seed_process(seed: int) -> None:
    """Python's, numpy's and torch's generators of this process (network initialisation, our augmentations)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WorkerSeeded:
    """A data loader whose worker process seeds torch and keeps to one thread when it starts (where
    batchgenerators calls ``set_thread_id``), as nnU-Net's own workers do; numpy is seeded by the augmenter."""

    def __init__(self, loader, seeds):
        self.loader, self.seeds = loader, list(seeds)

    def set_thread_id(self, thread_id: int) -> None:
        torch.manual_seed(self.seeds[thread_id])
        torch.set_num_threads(1)
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def seeded_workers(loader, processes: int, seed: int, stream: int, pin_memory: bool,
                   rank: Optional[int] = None) -> MultiThreadedAugmenter:
    """``processes`` workers over ``loader``, each with its own seed derived from (seed, stream) and, under
    DDP, the rank; their batches come back in a fixed order; as many batches cached as nnU-Net caches."""
    entropy = [seed, stream] + ([] if rank is None else [rank])
    seeds = [int(s) for s in np.random.SeedSequence(entropy).generate_state(processes)]
    return MultiThreadedAugmenter(WorkerSeeded(loader, seeds), None, processes, max(2, 6 // processes), seeds,
                                  pin_memory=pin_memory)


def random_state() -> dict:
    """The generators of this process, as plain values (no numpy arrays) for the checkpoint."""
    kind, key, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, key.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    for device, device_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(device_state.cpu(), device)  # as many GPUs as are visible now
