"""Unit tests of the pieces added for the cross-level (Zhao et al. 2022) and IDEAL (Basak et al.
2023) trainers, on tiny tensors (no nnU-Net run): the sub-patch grid, the stride factors, the cell
projection head, the position sampler, and the dual-decoder U-Net.

Expectations are computed independently of the library: explicit slicing loops, hand-written
lists, gradients of single outputs w.r.t. the input, the decoders' own softmax.
"""
import itertools
import re

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from conftest import PLANNED, planned_network
from nnunet_contrast.network.dual_decoder import (BilinearUpsampling, DualDecoderUNet, bilinear_decoder_like,
                                          mean_probability_logits)
from nnunet_contrast.network.heads import CellProjectionHead
from nnunet_contrast.data.pixel_selection import sample_positions
from nnunet_contrast.network.subpatches import SubPatchGrid, auto_grid, stride_factors, valid_grids
from nnunet_contrast.network.taps import total_stride


pytestmark = pytest.mark.usefixtures("one_thread")


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- valid_grids / auto_grid
@pytest.mark.parametrize("patch,valid,auto", [
    ((56, 40), [2, 4, 8], 4),        # nnU-Net's Hippocampus 2d patch
    ((320, 320), None, 5),           # the paper's 5 x 5 grid
    ((7, 7), [7], 7),                # none below 5: the smallest valid one
    ((7, 5), [], 0),                 # no valid grid at all
    ((12, 18), [2, 3, 6], 3),
    ((64, 64), [2, 4, 8, 16, 32, 64], 4),
    ((2, 2), [2], 2),
])
def test_valid_and_auto_grid(patch, valid, auto):
    if valid is not None:
        assert valid_grids(patch) == valid
    assert auto_grid(patch) == auto


def test_valid_grids_brute_force():
    for h in range(1, 30):
        for w in range(1, 30):
            expected = [n for n in range(2, 30) if h % n == 0 and w % n == 0]
            assert valid_grids((h, w)) == expected, (h, w)


def test_auto_grid_preferred():
    assert auto_grid((320, 320)) == 5
    assert auto_grid((320, 320), preferred=8) == 8
    assert auto_grid((320, 320), preferred=7) == 5
    assert auto_grid((56, 40), preferred=100) == 8
    assert auto_grid((56, 40), preferred=1) == 2


def test_auto_grid_with_larger_cells_for_small_patches():
    assert auto_grid((56, 40), (8, 8)) == 4  # cells of 14 x 10: one stride
    assert auto_grid((56, 40), (8, 8), min_strides=2) == 2  # cells of 28 x 20
    assert auto_grid((320, 320), (64, 64), min_strides=2) == 2
    assert SubPatchGrid((56, 40), 0, (8, 8), min_strides=2).cell == (28, 20)


# ----------------------------------------------------------------------------- SubPatchGrid
GRIDS = [((56, 40), 4, (8, 8)), ((45, 27), 3, (4, 2)), ((30, 18), 2, (16, 1)), ((20, 20), 5, (1, 1)),
         ((56, 40), 8, (8, 4))]


@pytest.mark.parametrize("patch,n,stride", GRIDS)
def test_cut_gives_row_major_cells(patch, n, stride):
    grid = SubPatchGrid(patch, n, stride)
    ch, cw = patch[0] // n, patch[1] // n
    assert grid.n == n and grid.cells == n * n and grid.cell == (ch, cw)
    images = rand(0, 2, 3, *patch)
    cells = grid.cut(images)
    assert cells.shape == (2, n * n, 3, ch, cw)
    rebuilt = torch.zeros_like(images)
    for r in range(n):
        for c in range(n):
            expected = images[..., r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
            assert torch.equal(cells[:, r * n + c], expected), (r, c)
            rebuilt[..., r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = cells[:, r * n + c]
    assert torch.equal(rebuilt, images)


@pytest.mark.parametrize("patch,n,stride", GRIDS)
def test_sub_patches_are_centred_zero_padded_cells(patch, n, stride):
    grid = SubPatchGrid(patch, n, stride)
    ch, cw = patch[0] // n, patch[1] // n
    images = rand(1, 2, 3, *patch) + 10.0  # no zero in the image itself
    subs = grid.sub_patches(images)
    ph, pw = subs.shape[2:]
    assert subs.shape[:2] == (2 * n * n, 3)
    for size, cell, s in ((ph, ch, stride[0]), (pw, cw, stride[1])):
        assert size % s == 0 and cell <= size < cell + s  # the next multiple of the stride
    assert grid.padded == (ph, pw)
    top, left = (ph - ch) // 2, (pw - cw) // 2  # centred: the odd pixel, if any, after
    for b in range(2):
        for r in range(n):
            for c in range(n):
                sub = subs[b * n * n + r * n + c]
                assert torch.equal(sub[:, top:top + ch, left:left + cw],
                                   images[b, :, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw])
                outside = sub.clone()
                outside[:, top:top + ch, left:left + cw] = 0
                assert torch.count_nonzero(outside) == 0


@pytest.mark.parametrize("patch,n,stride", GRIDS)
def test_crop_inverts_sub_patches(patch, n, stride):
    grid = SubPatchGrid(patch, n, stride)
    images = rand(2, 3, 2, *patch)
    assert torch.equal(grid.crop(grid.sub_patches(images)), grid.cut(images))
    # crop works on outputs with another channel count (logits of K classes)
    outputs = rand(3, 3 * n * n, 5, *grid.padded)
    cropped = grid.crop(outputs)
    assert cropped.shape == (3, n * n, 5, *grid.cell)
    (top, _), (left, _) = grid.padding
    assert torch.equal(cropped[2, n * n - 1], outputs[-1, :, top:top + grid.cell[0], left:left + grid.cell[1]])


@pytest.mark.parametrize("n", [1, 3, 5, 16, 57, -2])
def test_invalid_grid_raises_with_valid_values(n):
    with pytest.raises(ValueError, match=re.escape("[2, 4, 8]")):
        SubPatchGrid((56, 40), n, (8, 8))


def test_grid_zero_uses_auto_grid():
    assert SubPatchGrid((56, 40), 0, (8, 8)).n == 4
    assert SubPatchGrid((320, 320), 0, (32, 32)).n == 5
    assert SubPatchGrid((7, 7), 0, (1, 1)).n == 7
    with pytest.raises(ValueError, match="none"):
        SubPatchGrid((7, 5), 0, (1, 1))


@pytest.mark.parametrize("shape", [(1, 1, 56, 41), (1, 1, 40, 56), (2, 3, 28, 20)])
def test_wrong_input_size_raises(shape):
    grid = SubPatchGrid((56, 40), 4, (8, 8))
    with pytest.raises(ValueError):
        grid.cut(torch.zeros(shape))
    with pytest.raises(ValueError):
        grid.sub_patches(torch.zeros(shape))


def test_grid_is_2d_or_3d_with_a_stride_per_axis():
    for patch, stride in (((8, 8, 8, 8), (2, 2, 2, 2)), ((8, 8), (2, 2, 2)), ((8, 8, 8), (2, 2)), ((8,), (2,))):
        with pytest.raises(ValueError, match="2D or 3D"):
            SubPatchGrid(patch, 2, stride)


GRIDS_3D = [((40, 56, 40), 2, (8, 16, 8)), ((6, 9, 3), 3, (1, 2, 1)), ((8, 8, 8), 2, (4, 4, 4))]


@pytest.mark.parametrize("patch,n,stride", GRIDS_3D)
def test_3d_grid_cuts_row_major_cubes_and_pads_and_crops_them(patch, n, stride):
    grid = SubPatchGrid(patch, n, stride)
    cell = tuple(side // n for side in patch)
    assert grid.cells == n ** 3 and grid.cell == cell
    images = rand(12, 2, 3, *patch) + 10.0  # no zero in the image itself
    cells, subs = grid.cut(images), grid.sub_patches(images)
    assert cells.shape == (2, n ** 3, 3, *cell) and subs.shape == (2 * n ** 3, 3, *grid.padded)
    for size, side, s in zip(grid.padded, cell, stride):
        assert size % s == 0 and side <= size <= side + s
    front, top, left = (p for p, _ in grid.padding)
    for b in range(2):
        for index, (i, j, k) in enumerate(itertools.product(range(n), repeat=3)):  # row-major
            expected = images[b, :, i * cell[0]:(i + 1) * cell[0], j * cell[1]:(j + 1) * cell[1],
                              k * cell[2]:(k + 1) * cell[2]]
            assert torch.equal(cells[b, index], expected), (i, j, k)
            sub = subs[b * n ** 3 + index]
            inside = (slice(None), slice(front, front + cell[0]), slice(top, top + cell[1]), slice(left, left + cell[2]))
            assert torch.equal(sub[inside], expected)
            outside = sub.clone()
            outside[inside] = 0
            assert torch.count_nonzero(outside) == 0
    assert torch.equal(grid.crop(subs), cells)


def test_3d_grid_of_one_strided_cell_grows_along_the_smallest_stride():
    grid = SubPatchGrid((16, 32, 16), 2, (8, 16, 4))  # cells of 8 x 16 x 8 would leave a 1 x 1 x 2 bottleneck: fine
    assert grid.padded == (8, 16, 8)
    grid = SubPatchGrid((16, 32, 16), 2, (8, 16, 8))  # 1 x 1 x 1: one stride more along the first smallest axis
    assert grid.padded == (16, 16, 8) and grid.padding[0] == (4, 4)


def test_3d_auto_grid_on_hippocampus_patch():
    # nnU-Net's Hippocampus 3D patch: n divides 40, 56 and 40; cells of at least one stride (8, 16, 8) per side
    assert valid_grids((40, 56, 40)) == [2, 4, 8]
    grid = SubPatchGrid((40, 56, 40), 0, (8, 16, 8))
    assert grid.n == 2 and grid.cell == (20, 28, 20) and "2 x 2 x 2 sub-patches of 20 x 28 x 20 voxels" in grid.describe()


# ----------------------------------------------------------------------------- stride_factors
@pytest.mark.parametrize("size", range(1, 101))
def test_stride_factors_multiply_to_size(size):
    factors = stride_factors(size)
    assert len(factors) == 3
    assert all(isinstance(f, int) and f >= 1 for f in factors)
    assert factors[0] * factors[1] * factors[2] == size
    assert list(factors) == sorted(factors, reverse=True)


@pytest.mark.parametrize("size,expected", [(64, (4, 4, 4)), (14, (7, 2, 1)), (1, (1, 1, 1)), (8, (2, 2, 2)),
                                           (10, (5, 2, 1)), (7, (7, 1, 1)), (16, (4, 2, 2)), (27, (3, 3, 3))])
def test_stride_factors_known(size, expected):
    assert stride_factors(size) == expected


def test_stride_factors_other_part_counts():
    assert stride_factors(64, 2) == (8, 8)
    assert stride_factors(12, 1) == (12,)
    assert stride_factors(6, 4) == (3, 2, 1, 1)


# ----------------------------------------------------------------------------- CellProjectionHead
HEAD_CASES = [((14, 10), 4), ((15, 9), 3), ((8, 8), 2), ((7, 4), 2)]


def head(cell, seed=0, in_channels=2):
    torch.manual_seed(seed)
    return CellProjectionHead(in_channels, cell, hidden_dim=8, out_dim=6)


@pytest.mark.parametrize("cell,n", HEAD_CASES)
def test_cell_head_shape_and_unit_norm(cell, n):
    out = head(cell)(rand(4, 2, 2, n * cell[0], n * cell[1]))
    assert out.shape == (2, 6, n, n)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, n, n))
    # strides multiply to the cell, kernels equal strides
    convs = [m for m in head(cell).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert all(c.kernel_size == c.stride for c in convs)
    assert tuple(torch.tensor([c.stride for c in convs]).prod(0).tolist()) == cell


@pytest.mark.parametrize("cell,n", HEAD_CASES)
def test_cell_head_receptive_fields_do_not_overlap(cell, n):
    net = head(cell, seed=1)
    ch, cw = cell
    x = rand(5, 2, 2, n * ch, n * cw).requires_grad_(True)
    out = net(x)
    weights = rand(6, out.shape[1])
    for i in range(n):
        for j in range(n):
            (grad,) = torch.autograd.grad((out[1, :, i, j] * weights).sum(), x, retain_graph=True)
            inside = grad[1, :, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw].clone()
            assert torch.count_nonzero(inside) > 0, (i, j)
            grad = grad.clone()
            grad[1, :, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw] = 0
            assert torch.count_nonzero(grad) == 0, (i, j)


@pytest.mark.parametrize("cell,n", HEAD_CASES)
def test_cell_head_on_one_cell_equals_full_map_at_that_cell(cell, n):
    net = head(cell, seed=2)
    ch, cw = cell
    x = rand(7, 2, 2, n * ch, n * cw)
    with torch.no_grad():
        full = net(x)
        for i in range(n):
            for j in range(n):
                single = net(x[..., i * ch:(i + 1) * ch, j * cw:(j + 1) * cw])
                assert single.shape == (2, 6, 1, 1)
                torch.testing.assert_close(single[..., 0, 0], full[..., i, j], rtol=1e-5, atol=1e-6)


def test_cell_head_in_3d_sees_one_cube_per_output():
    cell, n = (4, 6, 2), 2
    torch.manual_seed(3)
    net = CellProjectionHead(2, cell, hidden_dim=8, out_dim=6)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 3 and tuple(torch.tensor([c.stride for c in convs]).prod(0).tolist()) == cell
    x = rand(13, 2, 2, *(n * side for side in cell))
    with torch.no_grad():
        full = net(x)
        assert full.shape == (2, 6, n, n, n)
        torch.testing.assert_close(full.norm(dim=1), torch.ones(2, n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            cube = x[..., i * cell[0]:(i + 1) * cell[0], j * cell[1]:(j + 1) * cell[1], k * cell[2]:(k + 1) * cell[2]]
            torch.testing.assert_close(net(cube)[..., 0, 0, 0], full[..., i, j, k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- sample_positions
@pytest.mark.parametrize("positions,count", [(10, 0), (10, 10), (10, 25), (1, 1), (7, -3)])
def test_sample_positions_all_in_order(positions, count):
    assert torch.equal(sample_positions(positions, count), torch.arange(positions))


@pytest.mark.parametrize("positions,count", [(10, 1), (10, 9), (100, 5), (2, 1)])
def test_sample_positions_distinct_subset(positions, count):
    torch.manual_seed(0)
    draws = []
    for _ in range(5):
        idx = sample_positions(positions, count)
        assert idx.shape == (count,) and idx.dtype == torch.long
        assert len(set(idx.tolist())) == count
        assert int(idx.min()) >= 0 and int(idx.max()) < positions
        draws.append(tuple(idx.tolist()))
    assert len(set(draws)) > 1  # random, not always the same positions


# ----------------------------------------------------------------------------- dual-decoder U-Net
STRIDES = [1, 2, 2, (2, 1)]
INPUT = (16, 8)


def small_unet(seed=0, deep_supervision=True):
    """A 2D, 4-stage nnU-Net U-Net, He-initialised as nnU-Net builds it."""
    torch.manual_seed(seed)
    net = PlainConvUNet(1, 4, [4, 8, 16, 16], nn.Conv2d, 3, STRIDES, 2, 3, 2, conv_bias=True,
                        norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    net.apply(InitWeights_He(1e-2))
    return net


def dual(seed=0, deep_supervision=True):
    unet = small_unet(seed, deep_supervision)
    torch.manual_seed(seed + 1000)
    return DualDecoderUNet(unet, InitWeights_He(1e-2))


def x_input(seed=3):
    return rand(seed, 2, 1, *INPUT)


def assert_mean_of_softmax(log_probs, first, second):
    expected = (first.softmax(1) + second.softmax(1)) / 2
    torch.testing.assert_close(log_probs.exp(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones_like(log_probs[:, 0]), rtol=1e-5, atol=1e-6)


def test_dual_forward_returns_each_decoders_logits_while_both_outputs_is_set():
    """IDEAL's training reads both decoders through ``forward``, the one method a compiled network runs."""
    model = dual().eval()
    x = x_input()
    with torch.no_grad():
        model.both_outputs = True
        first, second = model(x)
        model.both_outputs = False
        reference_first, reference_second = model.forward_both(x)
        mean = model(x)
    for got, expected in zip([*first, *second], [*reference_first, *reference_second]):
        torch.testing.assert_close(got, expected)
    assert_mean_of_softmax(mean[0], first[0], second[0])


def test_dual_forward_is_mean_probability_per_resolution():
    model = dual().eval()
    x = x_input()
    with torch.no_grad():
        outputs = model(x)
        first, second = model.forward_both(x)
    shapes = [(2, 3, 16, 8), (2, 3, 8, 4), (2, 3, 4, 2)]
    assert isinstance(outputs, (list, tuple)) and [tuple(o.shape) for o in outputs] == shapes
    assert [tuple(o.shape) for o in first] == shapes and [tuple(o.shape) for o in second] == shapes
    for out, a, b in zip(outputs, first, second):
        assert out.dtype == torch.float32
        assert_mean_of_softmax(out, a, b)
        # nnU-Net applies a softmax to network outputs: it must give the mean probabilities back
        torch.testing.assert_close(out.softmax(1), (a.softmax(1) + b.softmax(1)) / 2, rtol=1e-5, atol=1e-6)


def test_dual_without_deep_supervision_returns_one_full_resolution_tensor():
    model = dual().eval()
    x = x_input()
    with torch.no_grad():
        deep = model(x)
        model.decoder.deep_supervision = False
        single = model(x)
        first, second = model.forward_both(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *INPUT)
    assert isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
    assert first.shape == second.shape == (2, 3, *INPUT)
    assert_mean_of_softmax(single, first, second)
    torch.testing.assert_close(single, deep[0], rtol=1e-5, atol=1e-6)
    # and back on: the bilinear decoder follows again
    model.decoder.deep_supervision = True
    with torch.no_grad():
        first, second = model.forward_both(x)
    assert isinstance(second, (list, tuple)) and len(second) == 3


def test_dual_built_without_deep_supervision_follows_when_enabled():
    model = dual(deep_supervision=False).eval()
    with torch.no_grad():
        assert isinstance(model(x_input()), torch.Tensor)
        model.decoder.deep_supervision = True
        outputs = model(x_input())
    assert isinstance(outputs, (list, tuple)) and len(outputs) == 3


def test_dual_decoders_differ_and_bilinear_has_no_transposed_convs():
    model = dual().eval()
    with torch.no_grad():
        first, second = model.forward_both(x_input())
    for a, b in zip(first, second):
        assert not torch.allclose(a, b, rtol=1e-2, atol=1e-2)
    bilinear = model.decoder_bilinear
    assert not any(isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) for m in bilinear.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.decoder.modules())  # the original is intact
    ups = list(bilinear.transpconvs)
    assert len(ups) == len(model.decoder.transpconvs) == 3
    for up, transp in zip(ups, model.decoder.transpconvs):
        assert isinstance(up, BilinearUpsampling)
        assert up.stride == tuple(transp.stride)
        assert (up.conv.in_channels, up.conv.out_channels) == (transp.in_channels, transp.out_channels)
    assert [up.stride for up in ups] == [(2, 1), (2, 2), (2, 2)]
    # re-initialised, not a copy of the first decoder's weights
    for own, copy in zip(model.decoder.stages.parameters(), bilinear.stages.parameters()):
        if own.ndim > 1:
            assert own is not copy and not torch.equal(own, copy)


def named_ids(module, skip_prefix=None):
    return {id(p) for name, p in module.named_parameters() if skip_prefix is None or not name.startswith(skip_prefix)}


def test_dual_encoder_is_shared_not_duplicated():
    unet = small_unet()
    model = DualDecoderUNet(unet, InitWeights_He(1e-2))
    assert model.encoder is unet.encoder and model.decoder is unet.decoder
    assert model.decoder_bilinear.encoder is model.encoder
    assert model.decoder.encoder is model.encoder
    encoder = named_ids(model.encoder)
    decoder_own = named_ids(model.decoder, "encoder.")
    bilinear_own = named_ids(model.decoder_bilinear, "encoder.")
    assert encoder and decoder_own and bilinear_own
    assert not (encoder & decoder_own) and not (encoder & bilinear_own) and not (decoder_own & bilinear_own)
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params}) == len(encoder | decoder_own | bilinear_own)
    assert {id(p) for p in params} == encoder | decoder_own | bilinear_own
    assert {id(p) for p in unet.parameters()} <= {id(p) for p in params}
    numel = sum(p.numel() for p in params)
    bilinear_numel = sum(p.numel() for n, p in model.decoder_bilinear.named_parameters()
                         if not n.startswith("encoder."))
    assert numel == sum(p.numel() for p in unet.parameters()) + bilinear_numel


def test_dual_bilinear_loss_trains_the_shared_encoder_only_besides_itself():
    model = dual()
    _, second = model.forward_both(x_input())
    second[0].square().mean().backward()
    for p in model.encoder.parameters():
        assert p.grad is not None
    assert sum(p.grad.abs().sum() for p in model.encoder.parameters()) > 0
    for name, p in model.decoder.named_parameters():
        if not name.startswith("encoder."):
            assert p.grad is None, name


def test_dual_state_dict_round_trip():
    source, target = dual(seed=0).eval(), dual(seed=7).eval()
    x = x_input()
    with torch.no_grad():
        before = target(x)
        expected = source(x)
    assert not torch.allclose(before[0], expected[0])
    keys = source.state_dict().keys()
    assert any(k.startswith("decoder_bilinear.transpconvs.0.conv.") for k in keys)
    target.load_state_dict(source.state_dict(), strict=True)
    with torch.no_grad():
        after = target(x)
        both_source, both_target = source.forward_both(x), target.forward_both(x)
    for a, b in zip(after, expected):
        assert torch.equal(a, b)
    for decoder in range(2):
        for a, b in zip(both_source[decoder], both_target[decoder]):
            assert torch.equal(a, b)


def test_total_stride_of_the_unet_and_the_dual():
    assert total_stride(small_unet()) == (8, 4)
    assert total_stride(dual()) == (8, 4)


def test_bilinear_decoder_like_keeps_the_original():
    unet = small_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    bilinear = bilinear_decoder_like(unet.decoder, InitWeights_He(1e-2))
    assert bilinear.encoder is unet.encoder
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("stride,expected", [((2, 1), (6, 5)), (2, (6, 10)), ((2, 2), (6, 10))])
def test_bilinear_upsampling(stride, expected):
    torch.manual_seed(0)
    up = BilinearUpsampling(4, 6, stride)
    x = rand(8, 1, 4, 3, 5)
    out = up(x)
    assert out.shape == (1, 6, *expected)
    reference = up.conv(nn.functional.interpolate(x, size=expected, mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, reference)


def test_trilinear_upsampling_in_3d():
    torch.manual_seed(0)
    up = BilinearUpsampling(4, 6, (2, 2, 1))
    x = rand(9, 1, 4, 3, 5, 2)
    assert isinstance(up.conv, nn.Conv3d)
    reference = up.conv(nn.functional.interpolate(x, size=(6, 10, 2), mode="trilinear", align_corners=False))
    torch.testing.assert_close(up(x), reference)


@pytest.mark.parametrize("architecture", sorted(PLANNED))
def test_dual_decoder_on_nnunets_3d_networks_is_the_mean_probability(architecture):
    """The second decoder of nnU-Net's 3D PlainConvUNet and ResidualEncoderUNet: trilinear upsampling by each
    transposed convolution's own (anisotropic) stride, every deep-supervision output the mean of both softmaxes."""
    unet = planned_network(architecture, "3d_fullres")
    model = DualDecoderUNet(unet, InitWeights_He(1e-2)).eval()
    for up, transposed in zip(model.decoder_bilinear.transpconvs, unet.decoder.transpconvs):
        assert up.mode == "trilinear" and up.stride == tuple(transposed.stride) and isinstance(up.conv, nn.Conv3d)
    x = rand(10, 1, 1, 16, 24, 16)
    with torch.no_grad():
        outputs, (first, second) = model(x), model.forward_both(x)
    assert tuple(outputs[0].shape) == (1, 3, 16, 24, 16) and len(outputs) == len(first) == len(second) > 2
    for out, a, b in zip(outputs, first, second):
        assert a.shape == b.shape == out.shape and not torch.allclose(a, b)
        assert_mean_of_softmax(out, a, b)


def test_mean_probability_logits_matches_naive_and_is_stable():
    a, b = rand(9, 2, 4, 3, 3) * 3, rand(10, 2, 4, 3, 3) * 3
    out = mean_probability_logits(a, b)
    torch.testing.assert_close(out, ((a.softmax(1) + b.softmax(1)) / 2).log(), rtol=1e-5, atol=1e-6)
    # huge logits: the naive log of the mean probability would be -inf (probabilities underflow to 0)
    a = torch.tensor([1e4, 0.0, -1e4]).view(1, 3, 1, 1)
    b = torch.tensor([-1e4, 1e4, 0.0]).view(1, 3, 1, 1)
    out = mean_probability_logits(a, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().flatten(), torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(out.softmax(1).flatten(), torch.tensor([0.5, 0.5, 0.0]))
    # low-precision inputs give float32
    half = mean_probability_logits(a.half().clamp(-6e4, 6e4), b.to(torch.bfloat16))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
