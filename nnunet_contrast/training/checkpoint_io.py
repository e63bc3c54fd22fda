"""Our extras in nnU-Net's checkpoint, written once and read once.

nnU-Net's ``save_checkpoint`` builds its checkpoint dict and hands it to ``torch.save``; its
``load_checkpoint`` accepts only a file name (2.8.1 reads a dict argument as undefined) and calls
``torch.load``. Rather than copy those methods, we stand beside ``torch.save`` / ``torch.load`` for
the duration of that one call: the dict gets our extras on its way to disk, and the file we already
read is handed back instead of being read a second time. (The swap is process-wide for that call;
nnU-Net saves and loads checkpoints from its main thread only.)
"""
import contextlib
import os
from typing import Callable, Iterator

import torch

EXTRAS_KEY = "nnunet_contrast"


@contextlib.contextmanager
def extras_added_on_save(extras: Callable[[], dict], filename: str) -> Iterator[list]:
    """Inside: nnU-Net's checkpoint dict is saved once, with ``extras()`` under ``EXTRAS_KEY``, to a
    scratch file that then replaces ``filename`` (an interrupted save leaves the previous one intact).
    Yields a list that holds ``filename`` once it has been saved so."""
    real_save, scratch = torch.save, f"{filename}.tmp{os.getpid()}"

    def save(obj, f, *args, **kwargs):
        if f != filename or not isinstance(obj, dict):
            return real_save(obj, f, *args, **kwargs)
        added = extras()
        real_save({**obj, EXTRAS_KEY: added} if added else obj, scratch, *args, **kwargs)
        os.replace(scratch, filename)
        saved.append(filename)

    saved = []
    torch.save = save
    try:
        yield saved
    finally:
        torch.save = real_save
        if os.path.isfile(scratch):
            os.remove(scratch)


@contextlib.contextmanager
def loaded_checkpoint_served(filename: str, checkpoint: dict) -> Iterator[None]:
    """Inside: ``torch.load(filename, ...)`` returns ``checkpoint`` (already read) instead of reading again."""
    real_load = torch.load

    def load(f, *args, **kwargs):
        return checkpoint if f == filename else real_load(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load
