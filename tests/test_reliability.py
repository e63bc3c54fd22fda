"""Which unlabelled images keep their pseudo-labels early in self-training (training/reliability.py):
the entropy ranking against a loop over pixels and classes, the share's schedule, and the teacher
that applies it."""
import math

import pytest
import torch

from nnunet_contrast.losses.masked_segmentation import EXCLUDED
from nnunet_contrast.settings import resolve_settings
from nnunet_contrast.training.pseudo_labels import EmaTeacher
from nnunet_contrast.training.reliability import (CaseReliability, TeacherGate, mean_entropy, most_reliable,
                                                  reliable_share_at)
from nnunet_contrast.training.thresholds import FixedThreshold

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_entropy(probabilities):
    n, c = probabilities.shape[:2]
    values = []
    for b in range(n):
        pixels = probabilities[b].flatten(1)
        total = 0.0
        for p in range(pixels.shape[1]):
            total += -sum(float(q) * math.log(float(q)) for q in pixels[:, p] if q > 0)
        values.append(total / pixels.shape[1] / math.log(c))
    return values


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 2, 3, 4, 5)])
def test_mean_entropy_is_the_normalised_entropy_averaged_over_pixels(shape):
    probabilities = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3, 1)
    probabilities[0, :, 0] = 0
    probabilities[0, 0, 0] = 1  # certain pixels: p log p -> 0, no NaN
    assert mean_entropy(probabilities).tolist() == pytest.approx(loop_entropy(probabilities), rel=1e-5)


def test_mean_entropy_edge_cases():
    certain = torch.zeros(2, 3, 4, 4)
    certain[:, 1] = 1
    assert mean_entropy(certain).tolist() == [0.0, 0.0]
    uniform = torch.full((1, 4, 2, 2), 0.25)
    assert mean_entropy(uniform).tolist() == pytest.approx([1.0])
    assert mean_entropy(torch.ones(3, 1, 2, 2)).tolist() == [0.0, 0.0, 0.0]  # one class: no uncertainty


def test_most_reliable_keeps_the_lowest_entropy_share_and_at_least_one_image():
    entropy = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert most_reliable(entropy, 0.4).tolist() == [False, True, False, True, False]
    assert most_reliable(entropy, 0.5).tolist() == [False, True, False, True, True]  # ceil(2.5) = 3
    assert most_reliable(entropy, 0.01).tolist() == [False, True, False, False, False]  # ties: the earlier
    assert most_reliable(entropy, 1.0).all()
    with pytest.raises(ValueError, match="share must be in"):
        most_reliable(entropy, 0.0)


def test_the_share_rises_linearly_to_all_images():
    assert reliable_share_at(0.4, 0.5, 0.0) == 0.4
    assert reliable_share_at(0.4, 0.5, 0.25) == pytest.approx(0.7)
    assert reliable_share_at(0.4, 0.5, 0.5) == 1.0 and reliable_share_at(0.4, 0.5, 0.9) == 1.0
    assert reliable_share_at(0.4, 0.0, 0.0) == 0.4 and reliable_share_at(0.4, 0.0, 0.9) == 0.4  # no growth: fixed
    assert reliable_share_at(1.0, 0.5, 0.1) == 1.0 and reliable_share_at(1.0, 0.0, 0.1) == 1.0


class Pixelwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1)


def test_the_teacher_leaves_out_every_pixel_of_its_least_reliable_images():
    teacher = EmaTeacher(Pixelwise(), 0.9, FixedThreshold(0.0))
    logits = torch.zeros(4, 3, 2, 2)
    logits[0, 1], logits[2, 2] = 9.0, 5.0  # images 0 and 2 confident, 1 and 3 uniform
    teacher.logits = lambda images: logits
    labels = teacher(torch.zeros(4, 2, 2, 2), reliable_share=0.5)
    assert (labels[1] == EXCLUDED).all() and (labels[3] == EXCLUDED).all()
    assert (labels[0] == 1).all() and (labels[2] == 2).all()
    assert (teacher(torch.zeros(4, 2, 2, 2)) != EXCLUDED).all()  # share 1: the threshold alone


def test_reliability_settings_are_checked():
    def settings(**selftraining):
        return resolve_settings({"nnunet_contrast": {"selftraining": selftraining}}, ("base",))
    with pytest.raises(ValueError, match="selftraining.reliable_start must be > 0"):
        settings(reliable_start=0.0)
    with pytest.raises(ValueError, match="selftraining.reliable_growth must be in"):
        settings(reliable_growth=1.5)
    with pytest.raises(ValueError, match="selftraining.teacher_min_dice must be in"):
        settings(teacher_min_dice=1.5)
    assert settings().selftraining.teacher_min_dice == 0.0
    assert settings().selftraining.reliable_start == 1.0  # off unless asked for


def test_the_gate_opens_once_the_running_dice_reaches_its_minimum_and_stays_open():
    gate = TeacherGate(0.5, momentum=0.5)
    assert not gate.open and gate.update(float("nan")) is False and gate.dice is None  # no foreground: no news
    assert gate.update(0.2) is False and gate.dice == 0.2  # the first value starts the mean
    assert gate.update(0.6) is False and gate.dice == pytest.approx(0.4)
    assert gate.update(0.7) is True and gate.dice == pytest.approx(0.55)
    assert gate.update(0.0) is True and gate.dice == pytest.approx(0.55)  # open for good
    resumed = TeacherGate(0.5)
    resumed.load_state_dict(gate.state_dict())
    assert resumed.open and resumed.dice == gate.dice
    assert TeacherGate(0.0).open  # off: open from the start
    with pytest.raises(ValueError, match="needs a Dice in"):
        TeacherGate(1.2)


def test_cases_rank_by_the_mean_entropy_of_their_images_over_ranks():
    rank0, rank1 = CaseReliability(), CaseReliability()
    rank0.add(["a", "b", "a"], torch.tensor([0.2, 0.5, 0.4]))
    rank1.add(["c", "b"], torch.tensor([0.1, 0.3]))
    rank0.merge(rank1)
    assert [(case, pytest.approx(h), n) for case, h, n in rank0.ranking()] == \
        [("c", 0.1, 1), ("a", 0.3, 2), ("b", 0.4, 2)]
    assert CaseReliability().ranking() == []
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        rank1.add(["a", "b"], torch.zeros(3))
