"""Unit tests of the pieces added for the Chaitanya et al. trainers (pure tensors, no nnU-Net run):
decoder-block taps, pseudo-labelling rounds, foreground Dice and the pseudo-labeler, the dense
head without normalisation, the value rules of the new settings, the trainer list of the CLI,
and float32 losses under bf16 autocast.

Expectations are computed independently of the library: hooks on nnU-Net's own forward pass,
parameter names, naive loops, hand-written lists, the trainers' source parsed with ``ast``.
"""
import ast
import copy
import re

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_contrast.commands.cli import project_trainers
from nnunet_contrast.network.heads import DenseProjectionHead
from nnunet_contrast.losses import ClassMeanContrastLoss, NTXentLoss, RegionLocalLoss
from nnunet_contrast.training.dice import foreground_dice
from nnunet_contrast.training.pseudo_labels import EXCLUDED, PseudoLabeler, round_start_epochs
from nnunet_contrast.resources import bundled_dir
from nnunet_contrast.settings import resolve_settings
from nnunet_contrast.network.taps import (decoder_block_features, decoder_block_parameters, decoder_stage_count,
                                  tap_decoder_stage)

FEATURES = [8, 16, 32, 64]


def unet(deep_supervision=False, seed=0):
    """A 2D, 4-stage nnU-Net U-Net (3 decoder stages), built as nnU-Net builds its networks."""
    torch.manual_seed(seed)
    return PlainConvUNet(1, 4, FEATURES, nn.Conv2d, 3, [1, 2, 2, 2], 2, 3, 2, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                         deep_supervision=deep_supervision)


def image(batch=2, height=32, width=24, seed=1):
    return torch.randn(batch, 1, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- decoder-block taps
def test_decoder_stage_count_is_number_of_decoder_stages():
    assert decoder_stage_count(unet()) == len(FEATURES) - 1


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_decoder_block_features_equal_hooked_decoder_stage(blocks):
    net = unet().eval()
    x = image()
    with torch.no_grad():
        with tap_decoder_stage(net, blocks - 1) as tap:
            net(x)
        features = decoder_block_features(net, x, blocks)
    torch.testing.assert_close(features, tap["features"])


def test_last_decoder_block_equals_last_stage_of_normal_forward():
    net = unet(deep_supervision=True).eval()
    x = image()
    with torch.no_grad():
        with tap_decoder_stage(net) as tap:  # stage -1: the full-resolution one
            net(x)
        features = decoder_block_features(net, x, decoder_stage_count(net))
    torch.testing.assert_close(features, tap["features"])


def test_decoder_block_shapes():
    # input 32 x 24, strides 1, 2, 2, 2: decoder stage s works at the resolution of skip -(s + 2)
    expected = {1: (32, 8, 6), 2: (16, 16, 12), 3: (8, 32, 24)}
    net = unet()
    for blocks, (channels, height, width) in expected.items():
        with torch.no_grad():
            assert decoder_block_features(net, image(), blocks).shape == (2, channels, height, width)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_frozen_encoder_trains_only_the_first_decoder_blocks(blocks):
    net = unet()
    features = decoder_block_features(net, image(), blocks, train_encoder=False)
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(2))
    (features * weights).sum().backward()
    trained = tuple(f"decoder.{part}.{i}." for part in ("transpconvs", "stages") for i in range(blocks))
    for name, parameter in net.named_parameters():
        if name.startswith(trained):
            assert parameter.grad is not None, name
            if parameter.ndim > 1:
                assert parameter.grad.abs().sum() > 0, name
        else:  # the encoder, later decoder stages and the segmentation layers
            assert parameter.grad is None, name


def test_trained_encoder_gets_gradients():
    net = unet()
    decoder_block_features(net, image(), 2, train_encoder=True).square().mean().backward()
    grads = [p.grad for p in net.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_decoder_block_parameters_are_the_first_transpconvs_and_stages(blocks):
    net = unet()
    named = dict(net.named_parameters())
    prefixes = tuple(f"decoder.{part}.{i}." for part in ("transpconvs", "stages") for i in range(blocks))
    expected = {id(p) for name, p in named.items() if name.startswith(prefixes)}
    got = decoder_block_parameters(net, blocks)
    assert len(got) == len({id(p) for p in got}) == len(expected) > 0
    assert {id(p) for p in got} == expected
    later = {id(p) for i in range(blocks, 3) for m in (net.decoder.stages[i], net.decoder.transpconvs[i])
             for p in m.parameters()}
    assert not later & {id(p) for p in got}


@pytest.mark.parametrize("blocks", [0, 4, -1])
def test_decoder_block_features_rejects_missing_blocks(blocks):
    with pytest.raises(ValueError, match="does not exist"):
        decoder_block_features(unet(), image(), blocks)


# ----------------------------------------------------------------------------- pseudo-labelling rounds
@pytest.mark.parametrize("warmup, total, rounds, expected", [
    (1, 4, 3, [1, 2, 3]),            # 5000 warm-up + 3 x 5000 joint iterations, as epochs
    (250, 1000, 3, [250, 500, 750]),
    (0, 10, 3, [0, 3, 6]),
    (2, 12, 4, [2, 4, 7, 9]),        # 10 joint epochs: rounds of 2, 3, 2, 3
    (1, 3, 3, [1, 2]),               # 2 joint epochs, 3 rounds: collapse to 2
    (3, 4, 5, [3]),
    (4, 4, 3, []),                   # no joint epoch
    (5, 4, 2, []),
])
def test_round_start_epochs(warmup, total, rounds, expected):
    assert round_start_epochs(warmup, total, rounds) == expected


def test_round_start_epochs_split_evenly():
    for warmup in range(4):
        for total in range(warmup + 1, warmup + 15):
            for rounds in range(1, 8):
                starts = round_start_epochs(warmup, total, rounds)
                lengths = [b - a for a, b in zip(starts, starts[1:] + [total])]
                assert starts[0] == warmup and len(starts) == min(rounds, total - warmup)
                assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1, (warmup, total, rounds)


@pytest.mark.parametrize("rounds", [0, -2])
def test_round_start_epochs_needs_a_round(rounds):
    with pytest.raises(ValueError, match="at least one round"):
        round_start_epochs(1, 4, rounds)


# ----------------------------------------------------------------------------- foreground Dice
def naive_foreground_dice(a, b, num_classes, background=0):
    result = []
    for i in range(a.shape[0]):
        scores = []
        for c in range(num_classes):
            if c == background:
                continue
            in_a, in_b = (a[i] == c).tolist(), (b[i] == c).tolist()
            size_a = sum(sum(row) for row in in_a)
            size_b = sum(sum(row) for row in in_b)
            both = sum(x and y for ra, rb in zip(in_a, in_b) for x, y in zip(ra, rb))
            if size_a + size_b > 0:
                scores.append(2 * both / (size_a + size_b))
        result.append(sum(scores) / len(scores) if scores else 1.0)
    return torch.tensor(result)


@pytest.mark.parametrize("background", [0, 2])
def test_foreground_dice_matches_naive_loop(background):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (6, 7, 5), generator=g)
    b = torch.where(torch.rand(6, 7, 5, generator=g) < 0.3, torch.randint(0, 4, (6, 7, 5), generator=g), a)
    a[0], b[0] = background, background                  # neither has foreground: 1
    a[1], b[1] = background, background
    a[1, 0, 0] = (background + 1) % 4                    # one class in one map only: 0 for it
    b[2] = a[2]                                          # identical maps: 1
    a[3], b[3] = background, (background + 1) % 4        # disjoint: 0
    got = foreground_dice(a, b, 4, background=background)
    expected = naive_foreground_dice(a, b, 4, background)
    torch.testing.assert_close(got, expected)
    assert expected[0] == 1 and expected[1] == 0 and expected[2] == 1 and expected[3] == 0
    assert 0 < expected[4] < 1


# ----------------------------------------------------------------------------- pseudo-labeler
class PositionBiased(nn.Module):
    """Two-class logits: background 0.5, foreground = the image + 1 on the first ``first`` positions along the
    axis the bonus of shape ``bonus_shape`` varies on (the last one by default: columns; (8, 1, 1): a volume's
    depth). A zero image is labelled by position alone, so flipping it moves its foreground; an image of large
    magnitude is labelled pixel-wise, which flipping does not change."""

    def __init__(self, bonus_shape=(8,), first=5):
        super().__init__()
        bonus = torch.zeros(bonus_shape)
        bonus[:first] = 1.0
        self.register_buffer("bonus", bonus)

    def forward(self, x):
        foreground = x[:, 0] + self.bonus
        return torch.stack([torch.full_like(foreground, 0.5), foreground], 1)


def biased_batch():
    """Image 0: zero (foreground columns 0-4; flipped back: 3-7; Dice 2 * 2 / (5 + 5) = 0.4);
    image 1: a block of +10 in -10 (flip-consistent); image 2: all -10 (no foreground, Dice 1)."""
    x = torch.full((3, 1, 6, 8), -10.0)
    x[0] = 0.0
    x[1, 0, 1:4, 2:5] = 10.0
    return x


def test_pseudo_labeler_without_threshold_gives_argmax():
    x = biased_batch()
    labels = PseudoLabeler(PositionBiased())(x)
    expected = (x[:, 0] + PositionBiased().bonus > 0.5).long()
    assert labels.dtype == torch.long and labels.shape == (3, 6, 8)
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("threshold, excluded", [(0.3, []), (0.5, [0]), (0.9, [0]), (1.0, [0])])
def test_confidence_filter_excludes_flip_inconsistent_images(threshold, excluded):
    x = biased_batch()
    expected = (x[:, 0] + PositionBiased().bonus > 0.5).long()
    for i in excluded:
        expected[i] = EXCLUDED
    assert torch.equal(PseudoLabeler(PositionBiased(), min_flip_agreement=threshold)(x), expected)


def test_confidence_filter_flips_a_volume_along_depth_too():
    """Volume 0: zero (foreground slices 0-2 of its depth, flipped back 5-7: Dice 0), excluded; volume 1: a block of
    +10 in -10 (flip-consistent), kept as its argmax."""
    depth_biased = PositionBiased((8, 1, 1), first=3)
    x = torch.full((2, 1, 8, 4, 5), -10.0)
    x[0] = 0.0
    x[1, 0, 2:5, 1:3, 1:4] = 10.0
    expected = (x[:, 0] + depth_biased.bonus > 0.5).long()
    expected[0] = EXCLUDED
    labels = PseudoLabeler(depth_biased, min_flip_agreement=0.1)(x)
    assert labels.shape == (2, 8, 4, 5) and torch.equal(labels, expected)
    assert (labels[1] == 1).sum() == 3 * 2 * 3  # volume 1 has foreground, so keeping it is not vacuous


def test_confidence_filter_keeps_flip_equivariant_predictions():
    torch.manual_seed(4)
    conv = nn.Conv2d(1, 3, 1)
    x = image(batch=4, height=10, width=9, seed=5)
    labels = PseudoLabeler(conv, min_flip_agreement=1.0)(x)
    with torch.no_grad():
        expected = conv(x).argmax(1)
    assert (expected > 0).any()  # there is foreground to agree on
    assert torch.equal(labels, expected)


def test_pseudo_labeler_uses_full_resolution_output_under_deep_supervision():
    net = unet(deep_supervision=True)
    x = image()
    labels = PseudoLabeler(net)(x)
    with torch.no_grad():
        outputs = copy.deepcopy(net).eval()(x)
    assert isinstance(outputs, (list, tuple)) and outputs[0].shape[2:] == x.shape[2:]
    assert labels.dtype == torch.long and labels.shape == (2, 32, 24)
    assert torch.equal(labels, outputs[0].argmax(1))


def test_pseudo_labeler_keeps_a_frozen_copy():
    net = unet()
    x = image()
    labeler = PseudoLabeler(net)
    before = labeler(x)
    assert not any(p.requires_grad for p in labeler.network.parameters())
    assert all(p.requires_grad for p in net.parameters())  # the trainer's network still trains
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
        changed = net.eval()(x).argmax(1)
    assert not torch.equal(changed, before)  # the change matters for the original
    assert torch.equal(labeler(x), before)


def test_pseudo_labeler_state_dict_round_trip():
    x = image()
    labeler, other = PseudoLabeler(unet(seed=0)), PseudoLabeler(unet(seed=7))
    assert not torch.equal(labeler(x), other(x))
    other.load_state_dict(labeler.state_dict())
    assert torch.equal(other(x), labeler(x))
    assert set(labeler.state_dict()) == set(unet().state_dict())


# ----------------------------------------------------------------------------- dense head
def test_dense_head_normalize_switch():
    torch.manual_seed(8)
    raw_head = DenseProjectionHead(8, 16, 4, normalize=False)
    unit_head = DenseProjectionHead(8, 16, 4, normalize=True)
    unit_head.load_state_dict(raw_head.state_dict())
    x = torch.randn(2, 8, 6, 5)
    raw, unit = raw_head(x), unit_head(x)
    with torch.no_grad():
        conv0, conv1 = raw_head.net[0], raw_head.net[2]
        expected = nn.functional.conv2d(torch.relu(nn.functional.conv2d(x, conv0.weight, conv0.bias)),
                                        conv1.weight, conv1.bias)
    torch.testing.assert_close(raw, expected)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2, 6, 5), atol=1e-2)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(2, 6, 5))
    torch.testing.assert_close(unit, expected / expected.norm(dim=1, keepdim=True))


# ----------------------------------------------------------------------------- settings value rules
PSEUDO = ("base", "pseudolabel_chaitanya2023")
GLOBALLOCAL = ("base", "globallocal_chaitanya2020")


@pytest.mark.parametrize("presets, section, key, value, rule", [
    (PSEUDO, "pseudolabel", "warmup_fraction", 1.0, "must be in [0, 1)"),
    (PSEUDO, "pseudolabel", "warmup_fraction", -0.1, "must be in [0, 1)"),
    (PSEUDO, "pseudolabel", "min_flip_agreement", 1.5, "must be in [0, 1]"),
    (PSEUDO, "pseudolabel", "min_flip_agreement", -0.2, "must be in [0, 1]"),
    (PSEUDO, "pseudolabel", "matching", "foo", "must be one of"),
    (PSEUDO, "pseudolabel", "pseudo_label_rounds", 0, "must be at least 1"),
    (PSEUDO, "pseudolabel", "temperature", 0.0, "must be > 0"),
    (GLOBALLOCAL, "globallocal", "global_strategy", "XX", "must be one of"),
    (GLOBALLOCAL, "globallocal", "local_strategy", "GR", "must be one of"),
    (GLOBALLOCAL, "globallocal", "partitions", 0, "must be at least 1"),
    (GLOBALLOCAL, "globallocal", "decoder_blocks", 0, "must be at least 1"),
    (GLOBALLOCAL, "globallocal", "region_size", 0, "must be at least 1"),
    (PSEUDO, "globallocal", "partitions", 0, "must be at least 1"),  # other methods' sections are checked too
])
def test_new_settings_reject_bad_values(presets, section, key, value, rule):
    with pytest.raises(ValueError, match=re.escape(f"nnunet_contrast.{section}.{key} {rule}")):
        resolve_settings({"nnunet_contrast": {section: {key: value}}}, presets)


@pytest.mark.parametrize("presets, section, values", [
    (PSEUDO, "pseudolabel", {"warmup_fraction": 0.0, "min_flip_agreement": 1.0, "matching": "inter"}),
    (PSEUDO, "pseudolabel", {"warmup_fraction": 0.9, "min_flip_agreement": 1, "pseudo_label_rounds": 1}),
    (GLOBALLOCAL, "globallocal", {"global_strategy": "GR", "local_strategy": "LD", "partitions": 1,
                                  "decoder_blocks": 1, "region_size": 1}),
])
def test_new_settings_accept_valid_values_and_merge(presets, section, values):
    settings = resolve_settings({"nnunet_contrast": {section: values}}, presets, method_key=section).as_dict()
    preset = resolve_settings({}, presets, method_key=section).as_dict()
    assert settings[section] == {**preset[section], **values}
    assert settings["budget"] == preset["budget"] and settings["semisup"] == preset["semisup"]


# ----------------------------------------------------------------------------- CLI trainer list
def test_project_trainers_lists_every_trainer_class_of_trainers_folder():
    expected = set()
    for path in bundled_dir("trainers").glob("*.py"):
        tree = ast.parse(path.read_text())
        expected |= {node.name for node in tree.body
                     if isinstance(node, ast.ClassDef) and node.name.startswith("nnUNetTrainer")}
    trainers = project_trainers()
    assert trainers == sorted(expected)
    assert {"nnUNetTrainerPseudoLabelContrast", "nnUNetTrainerPseudoLabelContrastInter",
            "nnUNetTrainerGlobalLocalContrast", "nnUNetTrainerGlobalContrast"} <= set(trainers)


# ----------------------------------------------------------------------------- AMP safety
def class_mean_inputs():
    g = torch.Generator().manual_seed(9)
    embeddings = torch.randn(2, 8, 6, 6, generator=g)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    labels[:, 0, :3] = torch.tensor([0, 1, 2])  # every class in every image
    image, pixel, label = [], [], []
    for i in range(2):
        flat = labels[i].flatten()
        for c in (1, 2):
            for p in (flat == c).nonzero().flatten()[:2].tolist():
                image.append(i), pixel.append(p), label.append(c)
    return embeddings, labels, (torch.tensor(image), torch.tensor(pixel), torch.tensor(label))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["class_mean_intra", "class_mean_inter", "region_local",
                                  "region_local_groups", "ntxent_groups"])
def test_chaitanya_losses_stay_float32_under_autocast(name, dtype):
    """float16 (CUDA's autocast) and bfloat16 inputs under autocast give a float32 loss equal to the loss of the
    same values in float32 (the losses upcast before computing)."""
    g = torch.Generator().manual_seed(10)
    embeddings, labels, anchors = class_mean_inputs()
    r0, r1 = torch.randn(3, 5, 9, generator=g), torch.randn(3, 5, 9, generator=g)
    z0, z1 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    calls = {
        "class_mean_intra": lambda t: ClassMeanContrastLoss(0.1, "intra")(t(embeddings), labels, anchors, 3),
        "class_mean_inter": lambda t: ClassMeanContrastLoss(0.1, "inter")(t(embeddings), labels, anchors, 3,
                                                                          torch.tensor([1, 0])),
        "region_local": lambda t: RegionLocalLoss(0.1)(t(r0), t(r1)),
        "region_local_groups": lambda t: RegionLocalLoss(0.1)(t(r0), t(r1), torch.tensor([0, 0, 1])),
        "ntxent_groups": lambda t: NTXentLoss(0.1)(t(z0), t(z1), torch.tensor([0, 0, 1, 1, 2, 2])),
    }
    loss = calls[name]
    reference = loss(lambda v: v.to(dtype).float())  # the same values, representable in ``dtype``
    with torch.autocast("cpu", dtype=dtype):
        mixed = loss(lambda v: v.to(dtype))
    assert reference.dtype == mixed.dtype == torch.float32
    assert reference > 0
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
