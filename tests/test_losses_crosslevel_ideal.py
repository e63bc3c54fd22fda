"""Tests of the losses of Zhao et al. 2022 (cross-level contrast) and Basak et al. 2023 (IDEAL)
against naive, loop-based references.

Every reference is written from the equation in the module's docstring, independently of the
library: plain Python loops over images, positions / cells / pixels, negatives and classes, one
scalar torch operation at a time (explicit L2 normalisation v / sqrt(v.v), torch.exp / torch.log
on scalars, a softmax written out, argmax by comparing Python floats; no masks, no log-sum-exp),
in float64. Values AND gradients (torch.autograd.grad w.r.t. the inputs) are compared. The library
computes in float32, hence the tolerances.

1. Dense InfoNCE (Zhao Eq. 1, IDEAL L_loc): for image b, position i, with unit vectors,
   l(b, i) = -log(e^(q_bi.k_bi/tau) / (e^(q_bi.k_bi/tau) + sum_{n != i} e^(q_bi.g_bn/tau)));
   the loss is the mean over (b, i). g = k (negatives=None) or any other tensor (Zhao: g = q).
2. Patch-image consistency (Zhao Eq. 2): L = sum_cells MSE(softmax(patch), softmax(image)), each
   MSE the mean over images, classes and pixels of the cell; the image side detached.
3. Cross pseudo-supervision (IDEAL L_SSF): L = CE(p1, argmax p2) + CE(p2, argmax p1), each CE the
   mean over pixels, no gradient through the argmax targets.
"""
import itertools
import math

import pytest
import torch

from loss_checks import F64, GRAD_TOL, assert_finite, assert_matches, grad_of, randn
from nnunet_contrast.losses import CrossPseudoSupervisionLoss, DenseInfoNCELoss, PatchImageConsistencyLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_float32_matches(lib, ref, **tolerances):
    """``lib`` and ``ref``: (value, gradients) from ``grad_of``; the library's value is float32."""
    assert lib[0].dtype == torch.float32
    assert_matches(lib[0], ref[0], lib[1], ref[1], **tolerances)


# --------------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------------

def _zero():
    return torch.zeros((), dtype=F64)


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / |v|, written out."""
    return v / torch.sqrt(torch.dot(v, v))


def loop_dense_infonce(q, k, g, tau):
    """Mean over (image b, position i) of -log(e^pos / (e^pos + sum_{n != i} e^(q_bi.g_bn / tau)))."""
    batch, positions, _ = q.shape
    total = _zero()
    for b in range(batch):
        for i in range(positions):
            qi = unit(q[b, i])
            positive = torch.exp(torch.dot(qi, unit(k[b, i])) / tau)
            denominator = positive
            for n in range(positions):
                if n != i:
                    denominator = denominator + torch.exp(torch.dot(qi, unit(g[b, n])) / tau)
            total = total - torch.log(positive / denominator)
    return total / (batch * positions)


def loop_softmax(v):
    """Softmax of a vector of logits, one scalar at a time."""
    exps = [torch.exp(v[c]) for c in range(v.shape[0])]
    total = _zero()
    for e in exps:
        total = total + e
    return [e / total for e in exps]


def loop_patch_image(patch, image, detach_image=True):
    """sum over cells a of mean over (b, class, pixel or voxel) of (softmax(patch) - softmax(image))^2."""
    batch, cells, classes = patch.shape[:3]
    where = list(itertools.product(*(range(side) for side in patch.shape[3:])))
    image = image.detach() if detach_image else image
    total = _zero()
    for a in range(cells):
        acc = _zero()
        for b in range(batch):
            for position in where:
                p = loop_softmax(patch[(b, a, slice(None), *position)])
                t = loop_softmax(image[(b, a, slice(None), *position)])
                for c in range(classes):
                    acc = acc + (p[c] - t[c]) ** 2
        total = total + acc / (batch * classes * len(where))
    return total


def python_argmax(v):
    values = [float(x) for x in v.detach()]
    return max(range(len(values)), key=lambda c: values[c])


def loop_cross_entropy(v, target):
    """-log softmax(v)[target], written out."""
    return -torch.log(loop_softmax(v)[target])


def loop_cross_pseudo(logits1, logits2):
    """CE(logits1, argmax logits2) + CE(logits2, argmax logits1), each the mean over pixels."""
    batch, classes = logits1.shape[:2]
    l1, l2 = logits1.reshape(batch, classes, -1), logits2.reshape(batch, classes, -1)
    pixels = l1.shape[2]
    ce1, ce2 = _zero(), _zero()
    for b in range(batch):
        for p in range(pixels):
            y1, y2 = python_argmax(l1[b, :, p]), python_argmax(l2[b, :, p])  # plain ints: no gradient
            ce1 = ce1 + loop_cross_entropy(l1[b, :, p], y2)
            ce2 = ce2 + loop_cross_entropy(l2[b, :, p], y1)
    return ce1 / (batch * pixels) + ce2 / (batch * pixels)


# --------------------------------------------------------------------------------------------------
# 1. Dense InfoNCE
# --------------------------------------------------------------------------------------------------
SHAPES = [(1, 2, 3), (1, 5, 4), (2, 3, 5), (3, 4, 3), (2, 7, 2)]


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_dense_infonce_keys_as_negatives_matches_loop(seed, shape, tau):
    """IDEAL L_loc: negatives=None means the key view's other positions."""
    q, k = randn(seed, *shape, scale=2.0), randn(seed + 100, *shape)
    loss = DenseInfoNCELoss(tau)
    lib = grad_of(lambda a, b: loss(a, b), q, k)
    ref = grad_of(lambda a, b: loop_dense_infonce(a, b, b, tau), q, k)
    assert_float32_matches(lib, ref)
    # passing the keys explicitly is the same thing
    explicit = grad_of(lambda a, b: loss(a, b, b), q, k)
    assert_float32_matches(explicit, ref)


@pytest.mark.parametrize("seed,shape", list(enumerate(SHAPES)))
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_dense_infonce_queries_as_negatives_matches_loop(seed, shape, tau):
    """Zhao Eq. 1: negatives=q, the other cells of p(Z); the gradient flows through q in both roles."""
    q, k = randn(seed, *shape, scale=2.0), randn(seed + 100, *shape)
    loss = DenseInfoNCELoss(tau)
    lib = grad_of(lambda a, b: loss(a, b, a), q, k)
    ref = grad_of(lambda a, b: loop_dense_infonce(a, b, a, tau), q, k)
    assert_float32_matches(lib, ref)
    if shape[1] > 1:
        # the negative role of q matters: treating q as a constant negative gives another gradient
        q_only_query = grad_of(lambda a, b: loop_dense_infonce(a, b, a.detach(), tau), q, k)
        assert not torch.allclose(lib[1][0].double(), q_only_query[1][0], rtol=1e-3, atol=1e-4)
        # and q as negatives is not the same loss as k as negatives
        keys = loop_dense_infonce(q, k, k, tau)
        assert not torch.allclose(lib[0].double(), keys, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_infonce_separate_negatives_matches_loop(seed):
    """A third tensor of negatives: gradients w.r.t. q, k and the negatives."""
    q, k, g = randn(seed, 2, 4, 3), randn(seed + 10, 2, 4, 3, scale=0.5), randn(seed + 20, 2, 4, 3, scale=3.0)
    loss = DenseInfoNCELoss(0.2)
    lib = grad_of(lambda a, b, c: loss(a, b, c), q, k, g)
    ref = grad_of(lambda a, b, c: loop_dense_infonce(a, b, c, 0.2), q, k, g)
    assert_float32_matches(lib, ref)
    assert all(torch.count_nonzero(grad) > 0 for grad in lib[1])


def test_dense_infonce_negatives_are_only_from_the_same_image():
    """Changing image 1's keys leaves the terms of image 0 alone (negatives never cross images)."""
    q, k = randn(3, 2, 4, 3), randn(4, 2, 4, 3)
    k2 = k.clone()
    k2[1] = randn(5, 4, 3)
    loss = DenseInfoNCELoss(0.1)
    lib0 = grad_of(lambda a, b: loss(a, b), q, k)
    lib1 = grad_of(lambda a, b: loss(a, b), q, k2)
    torch.testing.assert_close(lib0[1][0][0], lib1[1][0][0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(lib0[1][0][1], lib1[1][0][1])


def test_dense_infonce_scale_invariant():
    """The vectors are L2-normalised: scaling any of them changes nothing."""
    q, k = randn(6, 2, 3, 4), randn(7, 2, 3, 4)
    scales = torch.tensor([0.01, 3.0, 250.0], dtype=F64).view(1, 3, 1)
    loss = DenseInfoNCELoss(0.1)
    torch.testing.assert_close(loss(q * scales, k / scales), loss(q, k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("negatives", ["keys", "queries"])
@pytest.mark.parametrize("batch", [1, 3])
def test_dense_infonce_single_position_is_exactly_zero(negatives, batch):
    q, k = randn(1, batch, 1, 4), randn(2, batch, 1, 4)
    loss = DenseInfoNCELoss(0.07)
    fn = (lambda a, b: loss(a, b)) if negatives == "keys" else (lambda a, b: loss(a, b, a))
    leaves = [q.clone().requires_grad_(True), k.clone().requires_grad_(True)]
    value = fn(*leaves)
    assert value.ndim == 0 and value.dtype == torch.float32
    assert value.item() == 0.0
    assert value.requires_grad  # a graph: the trainer can add it to other terms and backward
    value.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        assert torch.count_nonzero(leaf.grad) == 0


@pytest.mark.parametrize("positions", [2, 5])
def test_dense_infonce_identical_queries_and_keys(positions):
    q = randn(11, 2, positions, 3)
    loss = DenseInfoNCELoss(0.1)
    lib = grad_of(lambda a: loss(a, a), q)
    ref = grad_of(lambda a: loop_dense_infonce(a, a, a, 0.1), q)
    assert_float32_matches(lib, ref)
    # positive logit 1/tau is the largest, so 0 < l < log N
    assert 0.0 < lib[0].item() < math.log(positions)


@pytest.mark.parametrize("positions", [2, 4, 9])
def test_dense_infonce_all_vectors_equal_gives_log_n(positions):
    """All logits equal: -log(1 / N) = log N, whatever the temperature."""
    v = randn(12, 1, 1, 5).expand(2, positions, 5).contiguous()
    for tau in (0.01, 0.5):
        value = DenseInfoNCELoss(tau)(v, v * 7.0)
        assert value.item() == pytest.approx(math.log(positions), rel=1e-5)


@pytest.mark.parametrize("negatives", ["keys", "queries"])
def test_dense_infonce_large_logits_stay_finite(negatives):
    """tau = 0.01: logits up to +-100, e^100 overflows float32; the loss must not."""
    tau = 0.01
    q = randn(13, 2, 6, 4)
    k = q + 1e-3 * randn(14, 2, 6, 4)  # aligned: positive logits near 100
    loss = DenseInfoNCELoss(tau)
    fn = (lambda a, b: loss(a, b)) if negatives == "keys" else (lambda a, b: loss(a, b, a))
    ref_fn = ((lambda a, b: loop_dense_infonce(a, b, b, tau)) if negatives == "keys"
              else (lambda a, b: loop_dense_infonce(a, b, a, tau)))
    lib, ref = grad_of(fn, q, k), grad_of(ref_fn, q, k)
    assert_finite(*lib)
    assert_float32_matches(lib, ref, value_tol=dict(rtol=1e-3, atol=1e-4), grad_tol=dict(rtol=1e-3, atol=1e-3))
    # perfectly aligned and everything else orthogonal: the loss underflows towards 0, not NaN
    eye = torch.eye(4, dtype=F64).expand(2, 4, 4).contiguous()
    value, grads = grad_of(fn, eye, eye)
    assert_finite(value, grads)
    assert 0.0 <= value.item() < 1e-30


@pytest.mark.parametrize("shapes", [
    ((2, 3, 4), (2, 3, 5), None),
    ((2, 3, 4), (2, 4, 4), None),
    ((2, 3, 4), (1, 3, 4), None),
    ((2, 3, 4), (2, 3, 4), (2, 2, 4)),
    ((2, 3, 4), (2, 3, 4), (2, 3, 3)),
    ((3, 4), (3, 4), None),
    ((1, 2, 3, 4), (1, 2, 3, 4), None),
])
def test_dense_infonce_rejects_shape_mismatch(shapes):
    q, k = torch.randn(shapes[0]), torch.randn(shapes[1])
    g = None if shapes[2] is None else torch.randn(shapes[2])
    with pytest.raises(ValueError):
        DenseInfoNCELoss(0.1)(q, k, g)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (0, 0, 4)])
def test_dense_infonce_rejects_empty(shape):
    with pytest.raises(ValueError):
        DenseInfoNCELoss(0.1)(torch.randn(shape), torch.randn(shape))


def test_dense_infonce_rejects_zero_dim_embeddings():
    """(B, N, 0) is an empty tensor too (the error message promises non-empty inputs)."""
    q = torch.randn(2, 3, 0)
    with pytest.raises(ValueError):
        DenseInfoNCELoss(0.1)(q, q)


@pytest.mark.parametrize("tau", [0.0, -0.07, -1.0, float("nan")])
def test_dense_infonce_rejects_invalid_temperature(tau):
    with pytest.raises(ValueError):
        DenseInfoNCELoss(tau)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_infonce_low_precision_inputs_give_float32(dtype):
    q, k = torch.randn(2, 5, 4).to(dtype), torch.randn(2, 5, 4).to(dtype)
    q.requires_grad_(True)
    value = DenseInfoNCELoss(0.1)(q, k, q)
    assert value.dtype == torch.float32 and value.ndim == 0
    torch.testing.assert_close(value, DenseInfoNCELoss(0.1)(q.float(), k.float(), q.float()))
    value.backward()
    assert q.grad is not None and q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


# --------------------------------------------------------------------------------------------------
# 2. Patch-image consistency
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,shape", [(0, (1, 1, 2, 2, 2)), (1, (2, 4, 3, 2, 3)), (2, (3, 2, 1, 3, 1)),
                                        (3, (1, 9, 4, 1, 2)), (4, (2, 3, 2, 3, 3)),
                                        (5, (2, 8, 3, 2, 3, 2)), (6, (1, 27, 2, 1, 2, 1))])  # 3D cells
def test_patch_image_matches_loop(seed, shape):
    patch, image = randn(seed, *shape, scale=2.0), randn(seed + 50, *shape, scale=2.0)
    loss = PatchImageConsistencyLoss()
    lib = grad_of(lambda a, b: loss(a, b), patch, image)
    ref = grad_of(lambda a, b: loop_patch_image(a, b), patch, image)
    assert_float32_matches(lib, ref)
    if shape[2] > 1:
        assert lib[0].item() > 0 and torch.count_nonzero(lib[1][0]) > 0


def test_patch_image_image_side_gets_no_gradient():
    patch = randn(5, 2, 4, 3, 2, 2).requires_grad_(True)
    image = randn(6, 2, 4, 3, 2, 2).requires_grad_(True)
    value = PatchImageConsistencyLoss()(patch, image)
    g_patch, g_image = torch.autograd.grad(value, [patch, image], allow_unused=True)
    assert g_patch is not None and torch.count_nonzero(g_patch) > 0
    assert g_image is None or torch.count_nonzero(g_image) == 0
    # control: the undetached loss would give the image a gradient, so the check above bites
    _, ref_grads = grad_of(lambda a, b: loop_patch_image(a, b, detach_image=False), patch, image)
    assert torch.count_nonzero(ref_grads[1]) > 0


def test_patch_image_zero_when_sides_agree():
    patch = randn(7, 2, 4, 3, 3, 2)
    value, grads = grad_of(lambda a, b: PatchImageConsistencyLoss()(a, b), patch, patch)
    assert value.item() == 0.0
    assert torch.count_nonzero(grads[0]) == 0
    # softmax over the classes (dim 2): a per-pixel shift of all class logits changes nothing
    shift = randn(8, 2, 4, 1, 3, 2, scale=5.0)
    assert PatchImageConsistencyLoss()(patch, patch + shift).item() == pytest.approx(0.0, abs=1e-12)
    # ... but a shift per class does
    class_shift = randn(9, 1, 1, 3, 1, 1, scale=5.0)
    assert PatchImageConsistencyLoss()(patch, patch + class_shift).item() > 1e-3


def test_patch_image_sums_over_cells_and_averages_the_rest():
    patch, image = randn(10, 2, 3, 4, 2, 3), randn(11, 2, 3, 4, 2, 3)
    loss = PatchImageConsistencyLoss()
    base = loss(patch, image)
    assert base.item() > 0
    # duplicating the cells doubles the loss (a sum over cells) ...
    doubled = loss(torch.cat([patch, patch], 1), torch.cat([image, image], 1))
    torch.testing.assert_close(doubled, 2 * base, rtol=1e-5, atol=1e-7)
    # ... duplicating the images or the pixels of each cell does not (means)
    for dim in (0, 3, 4):  # images, rows, columns
        same = loss(torch.cat([patch, patch], dim), torch.cat([image, image], dim))
        torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-7)
    # the loss of all cells is the sum of the losses of each cell on its own
    per_cell = sum(loss(patch[:, a:a + 1], image[:, a:a + 1]) for a in range(3))
    torch.testing.assert_close(base, per_cell, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shapes", [
    ((2, 3, 2, 4, 4), (2, 3, 2, 4, 5)),
    ((2, 3, 2, 4, 4), (2, 4, 2, 4, 4)),
    ((2, 3, 2, 4, 4), (1, 3, 2, 4, 4)),
    ((3, 2, 4, 4), (3, 2, 4, 4)),
    ((1, 2, 3, 2, 4, 4, 2), (1, 2, 3, 2, 4, 4, 2)),  # 4D cells
    ((1, 2, 3, 2, 4, 4), (1, 2, 3, 2, 4, 5)),  # 3D cells of other sizes
])
def test_patch_image_rejects_shape_mismatch(shapes):
    with pytest.raises(ValueError):
        PatchImageConsistencyLoss()(torch.randn(shapes[0]), torch.randn(shapes[1]))


@pytest.mark.parametrize("shape", [(0, 3, 2, 4, 4), (2, 0, 2, 4, 4), (2, 3, 0, 4, 4), (2, 3, 2, 0, 4)])
def test_patch_image_rejects_empty(shape):
    with pytest.raises(ValueError):
        PatchImageConsistencyLoss()(torch.randn(shape), torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_image_low_precision_inputs_give_float32(dtype):
    patch, image = torch.randn(2, 4, 3, 2, 2).to(dtype), torch.randn(2, 4, 3, 2, 2).to(dtype)
    patch.requires_grad_(True)
    value = PatchImageConsistencyLoss()(patch, image)
    assert value.dtype == torch.float32 and value.ndim == 0
    torch.testing.assert_close(value, PatchImageConsistencyLoss()(patch.float(), image.float()))
    value.backward()
    assert patch.grad is not None and patch.grad.dtype == dtype


# --------------------------------------------------------------------------------------------------
# 3. Cross pseudo-supervision
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,shape", [(0, (1, 2, 3)), (1, (2, 3, 4, 3)), (2, (3, 4, 2, 2)), (3, (1, 5, 2, 3, 2)),
                                        (4, (2, 2, 1, 1))])
def test_cross_pseudo_matches_loop(seed, shape):
    l1, l2 = randn(seed, *shape, scale=2.0), randn(seed + 30, *shape, scale=2.0)
    loss = CrossPseudoSupervisionLoss()
    lib = grad_of(lambda a, b: loss(a, b), l1, l2)
    ref = grad_of(lambda a, b: loop_cross_pseudo(a, b), l1, l2)
    assert_float32_matches(lib, ref)
    assert all(torch.count_nonzero(g) > 0 for g in lib[1])


def test_cross_pseudo_targets_carry_no_gradient():
    """The gradient w.r.t. logits1 is that of CE(logits1, y2) alone, (softmax - onehot) / P; it does
    not depend on logits1 through y1 (a hard argmax has no gradient, and the library must not use a
    soft one either)."""
    l1, l2 = randn(20, 2, 3, 2, 2), randn(21, 2, 3, 2, 2)
    _, (g1, g2) = grad_of(lambda a, b: CrossPseudoSupervisionLoss()(a, b), l1, l2)
    pixels = 2 * 2 * 2
    for logits, other, grad in ((l1, l2, g1), (l2, l1, g2)):
        expected = torch.zeros_like(logits)
        for b in range(2):
            for y in range(2):
                for x in range(2):
                    p = loop_softmax(logits[b, :, y, x])
                    target = python_argmax(other[b, :, y, x])
                    for c in range(3):
                        expected[b, c, y, x] = (p[c] - (1.0 if c == target else 0.0)) / pixels
        torch.testing.assert_close(grad.double(), expected, **GRAD_TOL)


def test_cross_pseudo_is_symmetric():
    l1, l2 = randn(22, 2, 3, 3, 2), randn(23, 2, 3, 3, 2)
    loss = CrossPseudoSupervisionLoss()
    torch.testing.assert_close(loss(l1, l2), loss(l2, l1))


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (1, 1, 4)])
def test_cross_pseudo_single_class_is_zero(shape):
    value, grads = grad_of(lambda a, b: CrossPseudoSupervisionLoss()(a, b), randn(24, *shape), randn(25, *shape))
    assert_finite(value, grads)
    assert value.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("shapes", [
    ((2, 3, 4, 4), (2, 3, 4, 5)),
    ((2, 3, 4, 4), (2, 2, 4, 4)),
    ((2, 3, 4, 4), (1, 3, 4, 4)),
    ((2, 3), (2, 3)),
    ((3,), (3,)),
])
def test_cross_pseudo_rejects_shape_mismatch(shapes):
    with pytest.raises(ValueError):
        CrossPseudoSupervisionLoss()(torch.randn(shapes[0]), torch.randn(shapes[1]))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)])
def test_cross_pseudo_rejects_empty(shape):
    with pytest.raises(ValueError):
        CrossPseudoSupervisionLoss()(torch.randn(shape), torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_pseudo_low_precision_inputs_give_float32(dtype):
    l1, l2 = torch.randn(2, 3, 4, 4).to(dtype), torch.randn(2, 3, 4, 4).to(dtype)
    l1.requires_grad_(True)
    value = CrossPseudoSupervisionLoss()(l1, l2)
    assert value.dtype == torch.float32 and value.ndim == 0
    torch.testing.assert_close(value, CrossPseudoSupervisionLoss()(l1.float(), l2.float()))
    value.backward()
    assert l1.grad is not None and l1.grad.dtype == dtype
