"""Where a 2D sample comes from in its volume, and batches built from slice partitions.

Chaitanya et al. 2020 (G^D, L^D) split each volume's slices into ``S`` partitions along the slice
axis; slices of the same partition in different volumes show roughly the same anatomy. nnU-Net's
2D loader draws a random slice of a random case; the loaders here extend it to report each
sample's slice index and its volume's slice count, and to draw one slice from every partition of
several volumes.
"""
import math
from typing import Dict, List

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def partition_of(slice_index, slice_count, partitions: int):
    """Partition (0..partitions-1) of slice ``slice_index`` of a volume of ``slice_count`` slices:
    ``floor(slice_index * partitions / slice_count)``. Works on ints and numpy arrays."""
    return np.asarray(slice_index) * partitions // np.asarray(slice_count)


def partition_slices(partition: int, slice_count: int, partitions: int) -> range:
    """The slices of ``partition``: the inverse of ``partition_of``. Empty when slice_count < partitions
    leaves this partition without a slice."""
    return range(math.ceil(partition * slice_count / partitions),
                 math.ceil((partition + 1) * slice_count / partitions))


def slice_counts(dataset) -> Dict[str, int]:
    """Slices of every case of an nnU-Net dataset (axis 1 of the stored (C, Z, Y, X) array)."""
    return {key: int(dataset.load_case(key)[0].shape[1]) for key in dataset.identifiers}


def check_partitionable(counts: Dict[str, int], partitions: int) -> None:
    thin = {k: n for k, n in counts.items() if n < partitions}
    if thin:
        example = next(iter(thin))
        raise ValueError(f"{len(thin)} case(s) have fewer slices than the {partitions} partitions, e.g. "
                         f"{example} with {thin[example]}: lower 'partitions' or use the random strategy")


class SliceInfoDataLoader(nnUNetDataLoader):
    """nnU-Net's 2D data loader whose batches also carry ``slice_index`` and ``slice_count``
    (each sample's slice and its volume's number of slices)."""

    def generate_train_batch(self):
        self._slices: List[tuple] = []
        batch = super().generate_train_batch()
        batch["slice_index"] = np.array([s for s, _ in self._slices])
        batch["slice_count"] = np.array([n for _, n in self._slices])
        return batch

    def choose_slice(self, sample: int, slice_count: int, drawn: int) -> int:
        """The slice of sample ``sample``; nnU-Net's random (or foreground) choice by default."""
        return drawn

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        if not self.patch_size_was_2d:
            raise ValueError("slice positions exist for 2D patches only")
        lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        # axis 0 of a 2D patch (size 1) is the slice: nnU-Net's crop along it picks the slice
        lbs[0] = self.choose_slice(len(self._slices), int(data_shape[0]), int(lbs[0]))
        ubs[0] = lbs[0] + 1
        self._slices.append((lbs[0], int(data_shape[0])))
        return lbs, ubs


class PartitionDataLoader(SliceInfoDataLoader):
    """Batches of ``volumes`` different cases x one random slice from each of their ``partitions``
    slice partitions: sample ``v * partitions + p`` is partition ``p`` of the v-th volume. Every
    sample is a real slice (the reference code's G^D batches were a third empty images).

    Each case must have at least ``partitions`` slices (``check_partitionable``)."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, partitions: int = 4,
                 **kwargs):
        if partitions < 1 or batch_size < partitions or batch_size % partitions:
            raise ValueError(f"a partition batch holds one slice per partition of each volume: batch_size "
                             f"{batch_size} is not a positive multiple of partitions {partitions}")
        self.partitions = partitions
        self.volumes = batch_size // partitions
        if len(data.identifiers) < self.volumes:
            raise ValueError(f"a partition batch of {self.volumes} volumes needs as many cases, found "
                             f"{len(data.identifiers)}: lower the batch size")
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, **kwargs)

    def get_indices(self):
        cases = np.random.choice(len(self.indices), self.volumes, replace=False)
        return [self.indices[c] for c in cases for _ in range(self.partitions)]

    def choose_slice(self, sample: int, slice_count: int, drawn: int) -> int:
        choices = partition_slices(sample % self.partitions, slice_count, self.partitions)
        if not choices:
            raise ValueError(f"a volume of {slice_count} slices has an empty partition out of {self.partitions}")
        return int(np.random.choice(choices))
