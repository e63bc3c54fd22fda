"""The pieces of self-training (training/self_training.py) on small tensors: the masked nnU-Net loss
against a loop reference of its equation, the student's mixed batch, the EMA teacher, the ramp and
the schedule rules.

The loss reference (losses/masked_segmentation.py): at each deep-supervision resolution k, the
target is the full-resolution label map sampled at the nearest source pixel, floor((i + 0.5) H / h);
CE_k is the mean over kept pixels of -log softmax; SoftDice_k per foreground class is
(2 I + eps) / (G + P + eps) over the kept pixels (I: sum of s t, P: sum of s, G: sum of t), summed over
the batch (batch Dice) or per image, then averaged; the loss is sum_k w_k (CE_k - SoftDice_k).
"""
import math
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from loss_checks import assert_finite, assert_matches, grad_of, randn
from nnunet_contrast.data.batch import Batch
from nnunet_contrast.data.mixing import cutmix_boxes, fixed_boxes, labeled_copy_paste, student_batch
from nnunet_contrast.losses.masked_segmentation import EXCLUDED, MaskedSegmentationLoss, deep_supervision_targets
from nnunet_contrast.settings import resolve_settings
from nnunet_contrast.training.pseudo_labels import EmaTeacher
from nnunet_contrast.training.thresholds import FixedThreshold, SelfAdaptiveThreshold
from nnunet_contrast.training.dice import class_counts, mean_dice
from nnunet_contrast.training.schedule import (ENCODER, NETWORK, PSEUDO_LABEL, SEGMENTATION, Adam, Data, Labeller,
                                               NnUNetSGD, Schedule, Stage, Term, ramped)
from nnunet_contrast.training.method import MethodTrainer
from nnunet_contrast.training.self_training import (self_training_schedule, self_training_stages, teacher_curve_keys,
                                                    teacher_quality, teacher_validation_counts)

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 1e-5


# --------------------------------------------------------------------------------------------------
# the masked loss against its equation
# --------------------------------------------------------------------------------------------------
def nearest_label(labels, b, i, j, h, w):
    height, width = labels.shape[1:]
    return int(labels[b, min(math.floor((i + 0.5) * height / h), height - 1),
                      min(math.floor((j + 0.5) * width / w), width - 1)])


def reference_level(logits, labels, batch_dice):
    """CE - SoftDice at one resolution, with loops over images, pixels and classes."""
    n, k, h, w = logits.shape
    ce_sum, kept = 0.0, 0
    inter, pred, gt = {}, {}, {}
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = nearest_label(labels, b, i, j, h, w)
                if y == EXCLUDED:
                    continue
                exps = [torch.exp(logits[b, c, i, j]) for c in range(k)]
                total = sum(exps)
                ce_sum = ce_sum - torch.log(exps[y] / total)
                kept += 1
                for c in range(1, k):
                    key = c if batch_dice else (b, c)
                    s = exps[c] / total
                    inter[key] = inter.get(key, 0.0) + s * (1.0 if y == c else 0.0)
                    pred[key] = pred.get(key, 0.0) + s
                    gt[key] = gt.get(key, 0.0) + (1.0 if y == c else 0.0)
    keys = list(range(1, k)) if batch_dice else [(b, c) for b in range(n) for c in range(1, k)]
    dice = sum((2 * inter.get(key, 0.0) + EPS) / (gt.get(key, 0.0) + pred.get(key, 0.0) + EPS) for key in keys)
    dice = dice / len(keys)
    ce = ce_sum / kept if kept else 0.0
    return ce - dice


def reference_loss(outputs, labels, weights, batch_dice):
    if not (labels != EXCLUDED).any():
        return sum(o.sum() for o in outputs) * 0.0
    return sum(w * reference_level(o, labels, batch_dice) for o, w in zip(outputs, weights) if w != 0)


def random_labels(seed, shape, classes, excluded_share=0.3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=g)
    labels[torch.rand(shape, generator=g) < excluded_share] = EXCLUDED
    return labels


@pytest.mark.parametrize("batch_dice", [True, False])
def test_masked_loss_matches_its_equation_with_deep_supervision(batch_dice):
    full, half = randn(0, 2, 3, 6, 4), randn(1, 2, 3, 3, 2)
    labels = random_labels(2, (2, 6, 4), 3)
    weights = [0.6, 0.4]
    loss = MaskedSegmentationLoss(batch_dice, weights)
    lib = grad_of(lambda a, b: loss([a, b], labels), full, half)
    ref = grad_of(lambda a, b: reference_loss([a, b], labels, weights, batch_dice), full, half)
    assert_matches(lib[0], ref[0], lib[1], ref[1])
    assert lib[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_loss_computes_in_float32_from_low_precision_logits(dtype):
    """Logits of an autocast forward (CUDA's float16; bfloat16 on the CPU), with excluded pixels: a float32 loss
    equal to that of the same values in float32."""
    full, half = randn(0, 2, 3, 6, 4), randn(1, 2, 3, 3, 2)
    labels = random_labels(2, (2, 6, 4), 3)
    labels[0, :2] = EXCLUDED
    loss = MaskedSegmentationLoss(True, [0.6, 0.4])
    reference = loss([full.to(dtype).float(), half.to(dtype).float()], labels)
    with torch.autocast("cpu", dtype=dtype):
        mixed = loss([full.to(dtype), half.to(dtype)], labels)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)


def test_masked_loss_without_deep_supervision_and_a_zero_weight_level():
    logits, labels = randn(3, 3, 2, 5, 5), random_labels(4, (3, 5, 5), 2)
    lib = grad_of(lambda a: MaskedSegmentationLoss(True)(a, labels), logits)
    ref = grad_of(lambda a: reference_loss([a], labels, [1.0], True), logits)
    assert_matches(lib[0], ref[0], lib[1], ref[1])
    coarse = randn(5, 3, 2, 2, 2)
    lib = grad_of(lambda a, b: MaskedSegmentationLoss(True, [1.0, 0.0])([a, b], labels), logits, coarse)
    assert torch.count_nonzero(lib[1][1]) == 0  # nnU-Net leaves the lowest resolution out (weight 0)


def test_nothing_excluded_is_nnunets_own_loss():
    outputs, labels = [randn(6, 2, 3, 8, 8), randn(7, 2, 3, 4, 4)], random_labels(8, (2, 8, 8), 3, 0.0)
    dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    nnunet = DeepSupervisionWrapper(DC_and_CE_loss(dice, {}, weight_ce=1, weight_dice=1,
                                                   dice_class=MemoryEfficientSoftDiceLoss), [0.7, 0.3])
    targets = deep_supervision_targets(labels, outputs)
    torch.testing.assert_close(MaskedSegmentationLoss(True, [0.7, 0.3])(outputs, labels),
                               nnunet([o.float() for o in outputs], targets).float())


def test_in_3d_nothing_excluded_is_nnunets_own_loss():
    outputs = [randn(13, 2, 3, 4, 8, 8), randn(14, 2, 3, 2, 4, 4)]
    labels = random_labels(15, (2, 4, 8, 8), 3, 0.0)
    dice = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
    nnunet = DeepSupervisionWrapper(DC_and_CE_loss(dice, {}, weight_ce=1, weight_dice=1,
                                                   dice_class=MemoryEfficientSoftDiceLoss), [0.6, 0.4])
    torch.testing.assert_close(MaskedSegmentationLoss(False, [0.6, 0.4])(outputs, labels),
                               nnunet(outputs, deep_supervision_targets(labels, outputs)).float())


def test_deep_supervision_targets_are_nnunets_downsampling():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    labels = random_labels(9, (1, 10, 7), 4, 0.0)
    nnunet = DownsampleSegForDSTransform([[1, 1], [0.5, 0.5], [0.25, 0.25]])(segmentation=labels.clone().short())
    outputs = [torch.zeros(1, 4, *t.shape[1:]) for t in nnunet["segmentation"]]
    for ours, theirs in zip(deep_supervision_targets(labels, outputs), nnunet["segmentation"]):
        assert torch.equal(ours[:, 0].long(), theirs.long())


@pytest.mark.parametrize("case", ["no pixel kept", "one class", "one pixel of a class"])
def test_masked_loss_edge_cases(case):
    logits = randn(10, 2, 3, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    if case == "no pixel kept":
        labels[:] = EXCLUDED
    elif case == "one pixel of a class":
        labels[:] = EXCLUDED
        labels[1, 2, 3] = 2
    value, grads = grad_of(lambda a: MaskedSegmentationLoss(True)(a, labels), logits)
    assert_finite(value, grads)
    if case == "no pixel kept":
        assert value == 0 and torch.count_nonzero(grads[0]) == 0
    else:
        ref = grad_of(lambda a: reference_loss([a], labels, [1.0], True), logits)
        assert_matches(value, ref[0], grads, ref[1])
        if case == "one pixel of a class":
            assert torch.count_nonzero(grads[0].abs().sum(1)) == 1  # only that pixel has a gradient


@pytest.mark.parametrize("kept", ["all but one image", "no image"])
def test_self_training_terms_leave_out_images_without_a_kept_pixel(kept):
    """Without batch Dice, nnU-Net's Dice is a mean over images: one with no kept pixel must not enter it."""
    logits = randn(11, 3, 3, 4, 4)
    labels = torch.randint(0, 3, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    from_labeled = torch.zeros(3, 4, 4, dtype=torch.bool)
    from_labeled[0] = True                       # image 0 is labelled; 1 and 2 are unlabelled
    if kept == "no image":
        from_labeled[:] = True                   # nothing for the pseudo-label term
    else:
        labels[2] = EXCLUDED                     # image 2: every pseudo-label unconfident
    value = pseudo_label_loss(Batch(torch.zeros(3, 1, 4, 4), labels, from_labeled, 1), [logits], batch_dice=False)
    if kept == "no image":
        assert value == 0
    else:
        assert torch.allclose(value, MaskedSegmentationLoss(False)(logits[1:2], labels[1:2]))


def pseudo_label_loss(batch: Batch, outputs, batch_dice: bool) -> torch.Tensor:
    """The trainers' pseudo-label term on ``batch`` (the step's targets) and the joint pass's ``outputs``."""
    trainer = SimpleNamespace(target_loss=MaskedSegmentationLoss(batch_dice))
    trainer.loss_on = lambda inputs, labels: MethodTrainer.loss_on(trainer, inputs, labels)
    inputs = SimpleNamespace(trained=batch, joint=SimpleNamespace(outputs=outputs))
    return MethodTrainer.pseudo_label_loss(trainer, inputs)


def test_masked_loss_refuses_labels_of_another_shape():
    with pytest.raises(ValueError, match="labels must be"):
        MaskedSegmentationLoss(True)(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# the student's batch
# --------------------------------------------------------------------------------------------------
def test_fixed_boxes_have_their_size_and_stay_inside():
    torch.manual_seed(0)
    boxes = fixed_boxes(50, (9, 6), 2 / 3, torch.device("cpu"))
    for box in boxes:
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert (len(rows), len(cols)) == (6, 4) and box.sum() == 24
        assert rows.max() - rows.min() == 5 and cols.max() - cols.min() == 3  # one rectangle


def test_cutmix_boxes_are_boxes_of_the_sampled_areas_half_the_time():
    torch.manual_seed(0)
    boxes = cutmix_boxes(400, (40, 40), torch.device("cpu"))
    areas = boxes.flatten(1).sum(1).float() / 1600
    mixed = areas > 0
    assert 0.4 < mixed.float().mean() < 0.6
    assert areas[mixed].min() >= 0.005 and areas[mixed].max() <= 0.45


def one_box_each(boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box sides (n, d), checked to be one box: its pixels are the product of its extents."""
    sides = []
    for box in boxes:
        dims = box.ndim
        extents = [box.any(dim=tuple(d for d in range(dims) if d != axis)).nonzero().flatten() for axis in range(dims)]
        side = [len(e) for e in extents]
        assert all(e.max() - e.min() + 1 == n for e, n in zip(extents, side))  # contiguous along each axis
        assert box.sum() == torch.tensor(side).prod()
        sides.append(side)
    return torch.tensor(sides)


def test_fixed_boxes_in_3d_are_cuboids_of_their_size():
    torch.manual_seed(0)
    sides = one_box_each(fixed_boxes(30, (9, 12, 6), 2 / 3, torch.device("cpu")))
    assert (sides == torch.tensor([6, 8, 4])).all()


def test_cutmix_boxes_in_3d_are_cuboids_of_the_sampled_volumes_and_ratios():
    torch.manual_seed(0)
    boxes = cutmix_boxes(300, (40, 56, 40), torch.device("cpu"))
    mixed = boxes.flatten(1).any(1)
    assert 0.4 < mixed.float().mean() < 0.6
    sides = one_box_each(boxes[mixed]).float()
    shares = sides.prod(1) / (40 * 56 * 40)
    assert shares.min() >= 0.015 and shares.max() <= 0.42
    ratios = sides[:, :2] / sides[:, 2:]  # each side to the last axis's, log-uniform in (0.3, 1/0.3) before rounding
    assert ratios.min() > 0.25 and ratios.max() < 4 and ratios.min() < 0.5 and ratios.max() > 2


def mixing_inputs(spatial=(12, 9)):
    g = torch.Generator().manual_seed(0)
    labeled, unlabeled = torch.rand(3, 2, *spatial, generator=g), torch.rand(2, 2, *spatial, generator=g) + 10
    true_labels = torch.randint(0, 3, (3, *spatial), generator=g)
    pseudo = torch.randint(0, 3, (2, *spatial), generator=g) + 100  # marks pixels that came from unlabelled images
    return labeled, true_labels, unlabeled, pseudo


def mix(labeled, true_labels, unlabeled, pseudo, *args, **kwargs) -> Batch:
    return student_batch(Batch.labeled(labeled, true_labels) + Batch.unlabeled(unlabeled, pseudo), *args, **kwargs)


def test_no_mixing_is_the_batch_with_stronger_unlabelled_images():
    labeled, true_labels, unlabeled, pseudo = mixing_inputs()
    batch = mix(labeled, true_labels, unlabeled, pseudo, "none", 0.5, strong_intensity=False)
    assert torch.equal(batch.images, torch.cat([labeled, unlabeled])) and batch.n_labeled == 3
    assert torch.equal(batch.labels, torch.cat([true_labels, pseudo]))
    assert batch.true[:3].all() and not batch.true[3:].any()
    assert torch.equal(batch.true_labels[:3], true_labels) and (batch.true_labels[3:] == EXCLUDED).all()
    assert torch.equal(batch.pseudo_labels[3:], pseudo) and (batch.pseudo_labels[:3] == EXCLUDED).all()
    strong = mix(labeled, true_labels, unlabeled, pseudo, "none", 0.5)
    assert torch.equal(strong.images[:3], labeled) and not torch.equal(strong.images[3:], unlabeled)


@pytest.mark.parametrize("spatial, box_pixels", [((12, 9), 8 * 6), ((6, 12, 9), 4 * 8 * 6)])
def test_copy_paste_keeps_each_pixels_source_and_target(spatial, box_pixels):
    labeled, true_labels, unlabeled, pseudo = mixing_inputs(spatial)
    torch.manual_seed(1)
    batch = mix(labeled, true_labels, unlabeled, pseudo, "copypaste", 2 / 3, strong_intensity=False)
    came_from_unlabeled = batch.images[:, 0] >= 10
    assert torch.equal(~came_from_unlabeled, batch.true)  # each pixel's flag is its source
    assert torch.equal(batch.labels >= 100, came_from_unlabeled)  # and so is its target
    for i, image in enumerate(batch.images):
        box = came_from_unlabeled[i] if i < 3 else ~came_from_unlabeled[i]
        assert box.sum() == box_pixels  # a 2/3 box of the other kind of image in every image
        own = labeled[i] if i < 3 else unlabeled[i - 3]
        partner = unlabeled[i % 2] if i < 3 else labeled[(i - 3) % 3]
        assert torch.equal(image[:, ~box], own[:, ~box]) and torch.equal(image[:, box], partner[:, box])
        own_labels = true_labels[i] if i < 3 else pseudo[i - 3]
        partner_labels = pseudo[i % 2] if i < 3 else true_labels[(i - 3) % 3]
        assert torch.equal(batch.labels[i][~box], own_labels[~box])
        assert torch.equal(batch.labels[i][box], partner_labels[box])


@pytest.mark.parametrize("spatial", [(12, 9), (6, 12, 9)])
def test_cutmix_mixes_unlabelled_images_only(spatial):
    labeled, true_labels, unlabeled, pseudo = mixing_inputs(spatial)
    torch.manual_seed(2)
    batch = mix(labeled, true_labels, unlabeled, pseudo, "cutmix", 0.5, strong_intensity=False)
    assert torch.equal(batch.images[:3], labeled) and torch.equal(batch.labels[:3], true_labels)
    assert not torch.equal(batch.images[3:], unlabeled)  # a box was pasted
    for u in range(2):
        pasted = batch.images[3 + u, 0] != unlabeled[u, 0]
        partner = (u - 1) % 2
        assert torch.equal(batch.images[3 + u][:, pasted], unlabeled[partner][:, pasted])
        assert torch.equal(batch.labels[3 + u][pasted], pseudo[partner][pasted])
        assert torch.equal(batch.labels[3 + u][~pasted], pseudo[u][~pasted])
    assert not batch.true[3:].any()


def test_warm_up_copy_paste_pastes_the_next_labelled_image_with_its_labels():
    labeled, true_labels, _, _ = mixing_inputs()
    torch.manual_seed(3)
    batch = labeled_copy_paste(Batch.labeled(labeled, true_labels), 2 / 3)
    assert batch.n_labeled == 3 and batch.true.all()
    for i in range(3):
        partner = (i + 1) % 3
        box = (batch.images[i] != labeled[i]).any(0)  # random images: they differ at every pixel
        assert box.sum() == 8 * 6 and box.any(1).sum() == 8 and box.any(0).sum() == 6  # one 2/3 box
        assert torch.equal(batch.images[i][:, box], labeled[partner][:, box])
        assert torch.equal(batch.labels[i][box], true_labels[partner][box])
        assert torch.equal(batch.labels[i][~box], true_labels[i][~box])
    with pytest.raises(ValueError, match="labelled images only"):
        labeled_copy_paste(Batch.labeled(labeled, true_labels) + Batch.unlabeled(labeled), 2 / 3)


def test_unknown_mixing_is_refused():
    with pytest.raises(ValueError, match="mixing must be one of"):
        mix(*mixing_inputs(), "mixup", 0.5)


# --------------------------------------------------------------------------------------------------
# the EMA teacher
# --------------------------------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def test_teacher_follows_the_student_as_its_equation_says():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = EmaTeacher(student, decay=0.9, threshold=FixedThreshold(0.5))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.steps += 3
    teacher.update(student)
    for name, value in student.state_dict().items():
        if name == "steps":
            assert teacher.state_dict()[name] == 3  # not a float: copied
            continue
        for index in range(value.numel()):
            expected = 0.9 * before[name].flatten()[index].item() + 0.1 * value.flatten()[index].item()
            assert teacher.state_dict()[name].flatten()[index].item() == pytest.approx(expected, rel=1e-5)
    assert all(not p.requires_grad for p in teacher.network.parameters())


def test_teacher_leaves_out_unconfident_pixels():
    teacher = EmaTeacher(TinyNet(), 0.99, FixedThreshold(0.8))
    logits = torch.tensor([[[[3.0, 0.1]], [[0.0, 0.0]], [[0.0, 0.2]]]])  # (1, 3, 1, 2)
    teacher.logits = lambda images: logits
    assert teacher(torch.zeros(1, 2, 1, 2)).tolist() == [[[0, EXCLUDED]]]
    labels, kept = teacher.predict(torch.zeros(1, 2, 1, 2))
    assert labels.tolist() == [[[0, 2]]] and kept.tolist() == [[[True, False]]]


def test_teacher_refuses_a_decay_of_one():
    with pytest.raises(ValueError, match="decay must be in"):
        EmaTeacher(TinyNet(), 1.0, FixedThreshold(0.9))


def freematch_reference(batches, num_classes, momentum):
    """FreeMatch's Eq. 5-9 by loops over pixels: per batch of softmax maps (B, C, H, W), the running
    global mean of the maximum and class-wise mean of each probability, then each pixel's keep decision."""
    tau, class_mean = 1 / num_classes, [1 / num_classes] * num_classes
    decisions = []
    for q in batches:
        pixels = [q[b, :, i, j].tolist() for b in range(q.shape[0]) for i in range(q.shape[2]) for j in range(q.shape[3])]
        tau = momentum * tau + (1 - momentum) * sum(max(p) for p in pixels) / len(pixels)
        class_mean = [momentum * class_mean[c] + (1 - momentum) * sum(p[c] for p in pixels) / len(pixels)
                      for c in range(num_classes)]
        thresholds = [class_mean[c] / max(class_mean) * tau for c in range(num_classes)]
        decisions.append([max(p) >= thresholds[p.index(max(p))] for p in pixels])
    return tau, class_mean, decisions


def test_self_adaptive_threshold_follows_freematchs_equations():
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(2, 3, 4, 5, generator=g) * 3 + torch.tensor([2.0, 0, -1])[None, :, None, None]
              for _ in range(4)]
    batches = [torch.softmax(x, 1) for x in logits]
    threshold = SelfAdaptiveThreshold(3, momentum=0.7)
    teacher = EmaTeacher(TinyNet(), 0.9, threshold)
    labels_per_batch = []
    for x in logits:
        teacher.logits = lambda images, x=x: x
        labels_per_batch.append(teacher(torch.zeros(2, 2, 4, 5)))
    tau, class_mean, decisions = freematch_reference(batches, 3, 0.7)
    assert threshold.tau.item() == pytest.approx(tau) and threshold.class_mean.tolist() == pytest.approx(class_mean)
    for labels, q, keep in zip(labels_per_batch, batches, decisions):
        assert ((labels != EXCLUDED).flatten().tolist()) == keep
        assert torch.equal(labels[labels != EXCLUDED], q.argmax(1)[labels != EXCLUDED])
    assert 0 < sum(decisions[-1]) < len(decisions[-1])  # the thresholds keep some pixels and drop others
    rare = int(torch.tensor(class_mean).argmin())
    assert threshold.thresholds()[rare] < threshold.tau  # a rarely predicted class gets a lower threshold


def test_self_adaptive_threshold_round_trips_and_leaves_validation_alone():
    threshold = SelfAdaptiveThreshold(2, momentum=0.5)
    threshold.update(torch.softmax(torch.randn(1, 2, 3, 3), 1))
    restored = SelfAdaptiveThreshold(2, momentum=0.5)
    restored.load_state_dict(threshold.state_dict())
    assert torch.equal(restored.thresholds(), threshold.thresholds())
    teacher = EmaTeacher(TinyNet(), 0.9, threshold)
    teacher.logits = lambda images: torch.randn(1, 2, 3, 3)
    before = threshold.thresholds()
    teacher.predict(torch.zeros(1, 2, 3, 3))
    assert torch.equal(threshold.thresholds(), before)  # validation does not move the thresholds


@pytest.mark.parametrize("case", ["one class", "one pixel"])
def test_self_adaptive_threshold_edge_cases_stay_finite(case):
    q = torch.ones(1, 1, 2, 2) if case == "one class" else torch.softmax(torch.randn(1, 3, 1, 1), 1)
    threshold = SelfAdaptiveThreshold(q.shape[1], momentum=0.9)
    threshold.update(q)
    assert torch.isfinite(threshold.thresholds()).all()
    labels = q.argmax(1)
    assert threshold.of(labels).shape == labels.shape


def test_thresholds_refuse_values_out_of_range():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        FixedThreshold(1.5)
    with pytest.raises(ValueError, match="momentum in \\[0, 1\\)"):
        SelfAdaptiveThreshold(3, 1.0)


# --------------------------------------------------------------------------------------------------
# the ramp and the schedule
# --------------------------------------------------------------------------------------------------
def test_ramp_rises_over_the_terms_stages():
    weight = ramped(0.5, 0.5)
    assert weight(0.0) == pytest.approx(0.5 * math.exp(-5)) and weight(0.5) == weight(0.99) == 0.5
    assert ramped(0.3, 0) == 0.3  # no ramp: a constant weight
    term = Term(PSEUDO_LABEL, weight)
    stage = lambda name, epochs: Stage(name, epochs, 10, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION), term),
                                       Data.LABELED_AND_UNLABELED, labeller=Labeller.EMA_TEACHER)
    schedule = Schedule([Stage("warm", 2, 10, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION),)), stage("a", 1),
                         stage("b", 3)])
    assert schedule.term_progress(PSEUDO_LABEL, 1, 0) == 0.0
    assert schedule.term_progress(PSEUDO_LABEL, 2, 5) == pytest.approx(15 / 40)  # across the rounds


def settings(**selftraining):
    return resolve_settings({"nnunet_contrast": {"selftraining": selftraining,
                                                 "budget": {"num_epochs": 10}}}, ("base",))


def test_self_training_stages_warm_up_then_self_train():
    s = settings(warmup_fraction=0.25)
    warmup, selftrain = self_training_stages(s.budget, s.selftraining)
    assert (warmup.epochs, selftrain.epochs) == (3, 7) and warmup.is_nnunet_step
    assert selftrain.supervised and selftrain.data == Data.STUDENT
    assert selftrain.labeller == Labeller.EMA_TEACHER and warmup.labeller == Labeller.NONE
    assert warmup.optimizer_key() == selftrain.optimizer_key()  # one poly schedule over both
    bcp, _ = self_training_stages(s.budget, settings(warmup_mixing="copypaste").selftraining)
    assert bcp.data == Data.LABELED_MIXED and not bcp.is_nnunet_step and bcp.supervised


def test_finetune_selftraining_replaces_or_joins_the_methods_fine_tuning():
    s = settings()
    pretrain = Stage("global", 1, 5, (ENCODER,), Adam(1e-3), (Term("global_contrast"),), Data.LABELED_AND_UNLABELED)
    finetune = Stage("finetune", 10, 5, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION),), Data.LABELED)
    replaced = self_training_schedule([pretrain, finetune], s.budget, s.selftraining)
    assert [st.name for st in replaced] == ["global", "warmup", "selftrain"]
    joint = Stage("joint", 10, 5, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION), Term("contrast", 0.1)),
                  Data.LABELED_AND_UNLABELED)
    joined = self_training_schedule([finetune, joint], s.budget, s.selftraining)
    assert [st.name for st in joined] == ["finetune", "joint"] and joined[0].data == Data.LABELED
    assert [t.name for t in joined[1].terms] == [SEGMENTATION, "contrast", PSEUDO_LABEL]
    assert joined[1].data == Data.STUDENT and joined[1].labeller == Labeller.EMA_TEACHER


def test_a_stage_declares_a_labeller_only_for_unlabelled_images_and_the_student_reads_the_teacher():
    terms = (Term(SEGMENTATION),)
    with pytest.raises(ValueError, match="the student's batch is labelled by the EMA teacher"):
        Stage("s", 1, 1, (NETWORK,), NnUNetSGD(), terms, Data.STUDENT, labeller=Labeller.SNAPSHOT)
    with pytest.raises(ValueError, match="labels unlabelled images, which the stage does not read"):
        Stage("s", 1, 1, (NETWORK,), NnUNetSGD(), terms, Data.LABELED, labeller=Labeller.EMA_TEACHER)
    assert Stage("s", 1, 1, (NETWORK,), NnUNetSGD(), terms, Data.LABELED_AND_UNLABELED,
                 labeller=Labeller.SNAPSHOT).reads_unlabeled


def test_a_stage_refuses_terms_its_data_cannot_feed():
    with pytest.raises(ValueError, match="the segmentation term needs labelled images, which all images drops"):
        Stage("s", 1, 1, (NETWORK,), NnUNetSGD(), (Term(SEGMENTATION),), Data.ALL_IMAGES)
    with pytest.raises(ValueError, match="the pseudo_label term needs a labeller"):
        Stage("s", 1, 1, (NETWORK,), NnUNetSGD(), (Term(PSEUDO_LABEL),), Data.LABELED_AND_UNLABELED)


def test_self_training_settings_are_checked():
    with pytest.raises(ValueError, match="selftraining.mixing must be one of"):
        settings(mixing="mixup")
    with pytest.raises(ValueError, match="selftraining.ema_decay must be in"):
        settings(ema_decay=1.0)
    with pytest.raises(ValueError, match="selftraining.threshold must be one of"):
        settings(threshold="adaptive")
    with pytest.raises(ValueError, match="selftraining.threshold_momentum must be in"):
        settings(threshold_momentum=1.0)
    with pytest.raises(ValueError, match="selftraining.warmup_mixing must be one of"):
        settings(warmup_mixing="cutmix")


def test_teacher_dice_counts_leave_out_excluded_pixels_and_absent_classes():
    predicted = torch.tensor([[1, 1, 0, EXCLUDED], [2, 0, 0, 0]])
    target = torch.tensor([[1, 0, 0, EXCLUDED], [0, 0, 0, 0]])
    counts = class_counts(predicted, target, [1, 2, 3], EXCLUDED)
    assert counts.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]  # tp, fp, fn of classes 1, 2, 3
    # class 1: 2 / 3; class 2: only a false positive, 0; class 3 in neither: left out of the mean
    assert mean_dice(counts) == pytest.approx((2 / 3 + 0) / 2)
    assert math.isnan(mean_dice(class_counts(predicted * 0, target * 0, [1], EXCLUDED)))


def test_with_batch_dice_the_self_training_terms_keep_every_image_at_the_same_value():
    """Batch Dice sums over the batch, where an image without a kept pixel adds nothing: keeping it changes
    no value, and under DDP every rank then gathers sums of the same shape."""
    logits = randn(12, 3, 3, 4, 4)
    labels = torch.randint(0, 3, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    labels[2] = EXCLUDED
    batch = Batch(torch.zeros(3, 1, 4, 4), labels, torch.zeros(3, 4, 4, dtype=torch.bool), 0)
    assert torch.allclose(pseudo_label_loss(batch, [logits], batch_dice=True),
                          MaskedSegmentationLoss(True)(logits[:2], labels[:2]))


def test_teacher_quality_per_class_against_a_loop_over_pixels():
    """Per class: Dice of all labels, Dice of the confident ones, and the confident share of each class's
    predicted pixels; overall: foreground means and the confident share of all pixels; ``EXCLUDED``
    target pixels (nnU-Net's ignore label) count nowhere."""
    g = torch.Generator().manual_seed(3)
    predicted, target = torch.randint(0, 3, (2, 5, 6), generator=g), torch.randint(0, 3, (2, 5, 6), generator=g)
    target[0, 0] = EXCLUDED
    confidence = torch.rand(2, 5, 6, generator=g)
    teacher = SimpleNamespace(predict=lambda images: (predicted, confidence >= 0.5))
    outputs = [teacher_validation_counts(teacher, None, target, [0, 1, 2])]
    quality = teacher_quality(outputs, [0, 1, 2])

    pixels = [(p, t, c >= 0.5) for p, t, c in zip(predicted.flatten().tolist(), target.flatten().tolist(),
                                                    confidence.flatten().tolist()) if t != EXCLUDED]

    def dice(c, kept):
        tp = sum(1 for p, t, k in pixels if kept(k) and p == c and t == c)
        fp = sum(1 for p, t, k in pixels if kept(k) and p == c and t != c)
        fn = sum(1 for p, t, k in pixels if kept(k) and p != c and t == c)
        return 2 * tp / (2 * tp + fp + fn)
    for c in range(3):
        assert quality.dice[c] == pytest.approx(dice(c, lambda k: True))
        assert quality.confident_dice[c] == pytest.approx(dice(c, lambda k: k))
        of_class = [k for p, _, k in pixels if p == c]
        assert quality.coverage[c] == pytest.approx(sum(of_class) / len(of_class))
    assert quality.mean_dice == pytest.approx((quality.dice[1] + quality.dice[2]) / 2)
    assert quality.mean_confident_dice == pytest.approx((quality.confident_dice[1] + quality.confident_dice[2]) / 2)
    assert quality.overall_coverage == pytest.approx(sum(k for *_, k in pixels) / len(pixels))
    assert set(quality.curves()) == set(teacher_curve_keys([0, 1, 2])) - {"teacher_dice"}


def test_teacher_quality_of_a_class_never_predicted_is_nan_not_an_error():
    predicted = torch.zeros(1, 2, 2, dtype=torch.long)
    teacher = SimpleNamespace(predict=lambda images: (predicted, torch.ones(1, 2, 2, dtype=torch.bool)))
    quality = teacher_quality([teacher_validation_counts(teacher, None, predicted.clone(), [0, 1])], [0, 1])
    assert quality.coverage[0] == 1 and math.isnan(quality.coverage[1]) and math.isnan(quality.dice[1])
    assert math.isnan(quality.mean_dice)  # no foreground in either: nnU-Net's pseudo Dice is NaN too
