"""The step's one target type (data/batch.py) and how a trainer fills it from nnU-Net's target."""
from types import SimpleNamespace

import pytest
import torch

from nnunet_contrast.data.batch import Batch
from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.training.method import MethodTrainer


def test_a_labelled_batch_followed_by_an_unlabelled_one_keeps_each_pixels_target_and_source():
    labeled = Batch.labeled(torch.zeros(2, 1, 3, 3), torch.tensor([[[0, 1, 2]] * 3] * 2))
    pseudo = torch.full((3, 3, 3), 1)
    pseudo[0, 0, 0] = EXCLUDED
    joined = labeled + Batch.unlabeled(torch.ones(3, 1, 3, 3), pseudo)
    assert joined.images.shape == (5, 1, 3, 3) and joined.n_labeled == 2
    assert joined.labeled_part == slice(0, 2) and joined.unlabeled_part == slice(2, None)
    assert torch.equal(joined.true_labels[:2], labeled.labels) and (joined.true_labels[2:] == EXCLUDED).all()
    assert torch.equal(joined.pseudo_labels[2:], pseudo) and (joined.pseudo_labels[:2] == EXCLUDED).all()


def test_images_without_labeller_have_no_target():
    batch = Batch.unlabeled(torch.zeros(2, 1, 4, 5, 6))
    assert batch.labels.shape == (2, 4, 5, 6) and (batch.labels == EXCLUDED).all() and not batch.true.any()
    assert batch.n_labeled == 0


def test_labelled_images_come_first():
    unlabeled = Batch.unlabeled(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="labelled images comes first"):
        unlabeled + Batch.labeled(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("ignore_label", [None, 3])
def test_true_labels_are_nnunets_full_resolution_target_with_its_ignore_label_excluded(ignore_label):
    target = [torch.tensor([[[[0, 1], [2, 3]]]], dtype=torch.float32), torch.zeros(1, 1, 1, 1)]
    trainer = SimpleNamespace(label_manager=SimpleNamespace(has_ignore_label=ignore_label is not None,
                                                            ignore_label=ignore_label))
    labels = MethodTrainer.labels_of_target(trainer, target)
    expected = [[0, 1], [2, 3]] if ignore_label is None else [[0, 1], [2, EXCLUDED]]
    assert labels.dtype == torch.long and labels.tolist() == [expected]
