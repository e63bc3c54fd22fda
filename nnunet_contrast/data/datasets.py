"""Datasets and batches for the unlabelled pool, built on nnU-Net's own dataset classes."""
from pathlib import Path
from typing import List, Sequence

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, infer_dataset_class

SLICE_KEYS = ("slice_index", "slice_count")  # reported by nnunet_contrast.data.slices loaders


class UnionDataset(nnUNetBaseDataset):
    """Cases from several nnU-Net datasets (e.g. unlabelled training cases and added images)."""

    def __init__(self, parts: Sequence[nnUNetBaseDataset]):
        self.parts = [p for p in parts if len(p.identifiers)]
        identifiers = [i for p in self.parts for i in p.identifiers]
        if len(set(identifiers)) != len(identifiers):
            raise ValueError("UnionDataset: the same case identifier appears in two parts")
        self._owner = {i: p for p in self.parts for i in p.identifiers}
        super().__init__(folder=self.parts[0].source_folder if self.parts else "", identifiers=identifiers)

    def load_case(self, identifier):
        return self._owner[identifier].load_case(identifier)

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("UnionDataset is read-only")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        raise NotImplementedError("UnionDataset has no folder of its own")


def folder_dataset(folder: Path, identifiers: Sequence[str] = None):
    """nnU-Net's dataset class for ``folder`` (b2nd or npz), or None when there is nothing."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    dataset_class = infer_dataset_class(str(folder))
    ids = dataset_class.get_identifiers(str(folder)) if identifiers is None else list(identifiers)
    return dataset_class(str(folder), ids) if ids else None


class ImagesOnly:
    """Wraps a batch generator so that its batches carry images, case keys and slice positions
    (``SLICE_KEYS``, where the loader reports them) but no labels.

    This is the single gate through which unlabelled cases reach a trainer: whatever label array
    nnU-Net's loader read for them (a hidden true label, or a placeholder) is dropped here.
    """

    def __init__(self, generator):
        self.generator = generator

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.generator)
        return {"data": batch["data"], "keys": batch.get("keys"),
                **{key: batch[key] for key in SLICE_KEYS if key in batch}}

    def finish(self) -> None:
        finish = getattr(self.generator, "_finish", None)
        if finish is not None:
            finish()
