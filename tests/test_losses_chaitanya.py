"""Tests of the Chaitanya et al. losses and their helpers against naive, loop-based references.

Every reference below is written from the equations, independently of the library: plain Python
loops over anchors, pairs and regions, one scalar torch operation at a time (explicit cosine
similarity dot(a, b) / (|a| |b|), torch.exp / torch.log on scalars, no masks, no log-sum-exp),
in float64. Values AND gradients (torch.autograd.grad w.r.t. the inputs) are compared. The
library computes in float32, hence the tolerances.

Equations (docs: Chaitanya et al. 2020, NeurIPS, G^R / G^D / L^R / L^D; Chaitanya et al. 2023,
MedIA, Eq. 3-4):

1. NT-Xent with groups: views v = 0..2B-1 (v < B: z0[v], else z1[v - B]), group(v) =
   groups[v mod B]; s = cos / tau. Each (anchor a, positive p != a of a's group) gives
   -log(e^s(a,p) / (e^s(a,p) + sum_{k of another group} e^s(a,k))); the loss is the mean over the
   pairs whose anchor has a negative, 0 if none.
2. Region-local: maps m = 0..2B-1, groups as above; for each ordered pair (m, n), m != n, of one
   group and each region u: -log(e^s(m_u,n_u) / (e^s(m_u,n_u) + sum_{u'!=u} e^s(m_u,m_u')
   + sum_{u'!=u} e^s(m_u,n_u'))); mean of all terms.
3. Class means: mean of the raw embeddings over the pixels of each class (labels < 0 ignored).
4. Pixel-to-class-mean: candidates = normalised class means of the anchor's image (and of its
   partner for "inter"), background excluded unless background_negative; positives = candidates
   of the anchor's class, negatives = the other candidates; l = -1/|P| sum_p log(e^s(z,p) /
   (e^s(z,p) + sum_n e^s(z,n))); anchors without a positive or a negative skipped; mean over
   anchors per (image, class), over classes per image, over images.
"""
import itertools
import math
import random

import numpy as np
import pytest
import torch

from loss_checks import F64, GRAD_TOL, VALUE_TOL, assert_finite, assert_matches, grad_of, randn
from nnunet_contrast.losses import ClassMeanContrastLoss, NTXentLoss, RegionLocalLoss, class_means
from nnunet_contrast.data.pixel_selection import region_corners, region_vectors, sample_class_pixels
from nnunet_contrast.data.slices import check_partitionable, partition_of, partition_slices



# --------------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------------
def _zero():
    return torch.zeros((), dtype=F64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two vectors, written out: a.b / (|a| |b|)."""
    return torch.dot(a, b) / (torch.sqrt(torch.dot(a, a)) * torch.sqrt(torch.dot(b, b)))


def loop_ntxent_groups(z0, z1, tau, groups=None):
    batch = z0.shape[0]
    groups = list(range(batch)) if groups is None else [int(g) for g in groups]
    views = [z0[b] for b in range(batch)] + [z1[b] for b in range(batch)]
    n = 2 * batch
    group = [groups[v % batch] for v in range(n)]
    s = [[cosine(views[a], views[b]) / tau for b in range(n)] for a in range(n)]
    terms = []
    for a in range(n):
        negatives = [k for k in range(n) if group[k] != group[a]]
        if not negatives:
            continue
        neg_sum = _zero()
        for k in negatives:
            neg_sum = neg_sum + torch.exp(s[a][k])
        for p in range(n):
            if p == a or group[p] != group[a]:
                continue
            e = torch.exp(s[a][p])
            terms.append(-torch.log(e / (e + neg_sum)))
    if not terms:
        return _zero()
    total = _zero()
    for t in terms:
        total = total + t
    return total / len(terms)


def loop_region_local(r0, r1, tau, groups=None):
    batch, regions = r0.shape[:2]
    groups = list(range(batch)) if groups is None else [int(g) for g in groups]
    maps = [r0[b] for b in range(batch)] + [r1[b] for b in range(batch)]
    n_maps = 2 * batch
    group = [groups[m % batch] for m in range(n_maps)]
    # cos between region u of map m and region v of map n
    s = {}
    for m in range(n_maps):
        for u in range(regions):
            for n in range(n_maps):
                for v in range(regions):
                    if (n, v, m, u) in s:
                        s[(m, u, n, v)] = s[(n, v, m, u)]
                    else:
                        s[(m, u, n, v)] = cosine(maps[m][u], maps[n][v]) / tau
    total, count = _zero(), 0
    for m in range(n_maps):
        for n in range(n_maps):
            if m == n or group[m] != group[n]:
                continue
            for u in range(regions):
                pos = torch.exp(s[(m, u, n, u)])
                denominator = pos
                for u2 in range(regions):
                    if u2 != u:
                        denominator = denominator + torch.exp(s[(m, u, m, u2)])
                        denominator = denominator + torch.exp(s[(m, u, n, u2)])
                total = total - torch.log(pos / denominator)
                count += 1
    return total / count


def positions(shape):
    """Every pixel (2D) or voxel (3D) position of a map of ``shape``, in row-major order."""
    return list(itertools.product(*(range(side) for side in shape)))


def position_of(flat_index, shape):
    """The position of a row-major flat index into a map of ``shape``."""
    position = []
    for side in reversed(shape):
        flat_index, coordinate = divmod(flat_index, side)
        position.insert(0, coordinate)
    return tuple(position)


def loop_class_means(embeddings, labels, num_classes):
    """(B, K) lists of mean vectors (None when absent), built pixel by pixel (voxel by voxel in 3D)."""
    batch, channels = embeddings.shape[:2]
    out = []
    for b in range(batch):
        row = []
        for k in range(num_classes):
            acc, count = torch.zeros(channels, dtype=F64), 0
            for where in positions(labels.shape[1:]):
                if int(labels[(b, *where)]) == k:
                    acc = acc + embeddings[(b, slice(None), *where)]
                    count += 1
            row.append(acc / count if count else None)
        out.append(row)
    return out


def loop_class_mean_terms(embeddings, labels, anchors, num_classes, tau, matching="intra",
                          background_negative=False, background=0, partners=None):
    """{(image, class): [loss of each valid anchor]}."""
    means = loop_class_means(embeddings, labels, num_classes)
    images, pixels, labs = ([int(v) for v in t] for t in anchors)
    per_group = {}  # (image, class) -> list of anchor losses
    for b, pix, c in zip(images, pixels, labs):
        z = embeddings[(b, slice(None), *position_of(pix, labels.shape[1:]))]
        sources = [b] if matching == "intra" else [b, int(partners[b])]
        candidates = []  # (class, mean vector)
        for src in sources:
            for k in range(num_classes):
                if means[src][k] is None:
                    continue
                if k == background and not background_negative:
                    continue
                candidates.append((k, means[src][k]))
        positives = [vec for k, vec in candidates if k == c]
        negatives = [vec for k, vec in candidates if k != c]
        if not positives or not negatives:
            continue
        negative_sum = _zero()
        for vec in negatives:
            negative_sum = negative_sum + torch.exp(cosine(z, vec) / tau)
        acc = _zero()
        for vec in positives:  # Eq. 4: e^s(z, p) / (e^s(z, p) + sum over the negatives)
            e = torch.exp(cosine(z, vec) / tau)
            acc = acc + torch.log(e / (e + negative_sum))
        per_group.setdefault((b, c), []).append(-acc / len(positives))
    return per_group


def loop_class_mean_loss(embeddings, labels, anchors, num_classes, tau, matching="intra",
                         background_negative=False, background=0, partners=None):
    per_group = loop_class_mean_terms(embeddings, labels, anchors, num_classes, tau, matching,
                                      background_negative, background, partners)
    if not per_group:
        return _zero()
    per_image = {}
    for (b, _), values in per_group.items():
        total = _zero()
        for v in values:
            total = total + v
        per_image.setdefault(b, []).append(total / len(values))
    total = _zero()
    for values in per_image.values():
        image_total = _zero()
        for v in values:
            image_total = image_total + v
        total = total + image_total / len(values)
    return total / len(per_image)


# --------------------------------------------------------------------------------------------------
# 1. NT-Xent with groups (G^R, G^D)
# --------------------------------------------------------------------------------------------------
def check_two_view_loss(loss, loop_reference, x0, x1, tau, groups=None):
    """The library loss against its loop reference on two views (values and gradients)."""
    lib_value, lib_grads = grad_of(lambda a, b: loss(a, b, groups), x0, x1)
    ref_value, ref_grads = grad_of(lambda a, b: loop_reference(a, b, tau, groups), x0, x1)
    assert_matches(lib_value, ref_value, lib_grads, ref_grads)
    return lib_value, lib_grads


def check_ntxent(z0, z1, tau, groups=None):
    return check_two_view_loss(NTXentLoss(temperature=tau), loop_ntxent_groups, z0, z1, tau, groups)


@pytest.mark.parametrize("seed,batch,dim", [(0, 1, 3), (1, 2, 4), (2, 4, 5), (3, 6, 3)])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_default_groups_match_loop(seed, batch, dim, tau):
    z0, z1 = randn(seed, batch, dim, scale=2.0), randn(seed + 100, batch, dim)
    check_ntxent(z0, z1, tau)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("groups", [[0, 1, 0, 1, 2, 2], [0, 0, 0, 1, 1, 1], [3, 3, 7, 9, 7, 3],
                                    [0, 0, 0, 0, 0, 1]])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_partition_groups_match_loop(seed, groups, tau):
    z0, z1 = randn(seed, 6, 4), randn(seed + 50, 6, 4)
    groups = torch.tensor(groups)
    value, _ = check_ntxent(z0, z1, tau, groups)
    # sensitivity: partition positives change the loss (so the comparison above bites)
    default = loop_ntxent_groups(z0, z1, tau)
    assert not torch.allclose(value.double(), default, rtol=1e-3, atol=1e-3)


def test_ntxent_default_groups_is_simclr():
    """groups=None is the standard SimCLR NT-Xent: denominator over every view but the anchor."""
    z0, z1 = randn(7, 5, 4), randn(8, 5, 4)
    tau = 0.3
    n = 10
    views = [z0[b] for b in range(5)] + [z1[b] for b in range(5)]
    total = 0.0
    for i in range(n):
        j = (i + 5) % n
        den = sum(math.exp(float(cosine(views[i], views[k])) / tau) for k in range(n) if k != i)
        total -= math.log(math.exp(float(cosine(views[i], views[j])) / tau) / den)
    assert NTXentLoss(tau)(z0, z1).item() == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("seed,batch", [(0, 1), (1, 3), (2, 6)])
def test_ntxent_arange_groups_equal_none(seed, batch):
    z0, z1 = randn(seed, batch, 4), randn(seed + 9, batch, 4)
    loss = NTXentLoss(0.2)
    v_none, g_none = grad_of(lambda a, b: loss(a, b), z0, z1)
    v_arange, g_arange = grad_of(lambda a, b: loss(a, b, torch.arange(batch)), z0, z1)
    # any labelling that gives each image its own group is the same
    v_other, g_other = grad_of(lambda a, b: loss(a, b, torch.arange(batch) * 3 + 11), z0, z1)
    for v, g in ((v_arange, g_arange), (v_other, g_other)):
        torch.testing.assert_close(v, v_none, rtol=1e-6, atol=1e-7)
        for a, b in zip(g, g_none):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_ntxent_single_group_is_exactly_zero(batch):
    z0, z1 = randn(4, batch, 3), randn(5, batch, 3)
    value, grads = grad_of(lambda a, b: NTXentLoss(0.1)(a, b, torch.full((batch,), 4)), z0, z1)
    assert_finite(value, grads)
    assert value.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert loop_ntxent_groups(z0, z1, 0.1, [4] * batch).item() == 0.0


@pytest.mark.parametrize("shape", [(3,), (5,), (1, 4), (4, 1), (2, 4), ()])
def test_ntxent_rejects_bad_groups_shape(shape):
    z0, z1 = randn(0, 4, 3), randn(1, 4, 3)
    with pytest.raises(ValueError):
        NTXentLoss(0.5)(z0, z1, torch.zeros(shape, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# 2. Region-local loss (L^R, L^D)
# --------------------------------------------------------------------------------------------------
def check_region(r0, r1, tau, groups=None):
    return check_two_view_loss(RegionLocalLoss(temperature=tau), loop_region_local, r0, r1, tau, groups)


@pytest.mark.parametrize("seed,batch,regions,dim", [(0, 1, 2, 3), (1, 2, 4, 5), (2, 3, 5, 4), (3, 2, 13, 3)])
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_region_local_default_groups_match_loop(seed, batch, regions, dim, tau):
    r0, r1 = randn(seed, batch, regions, dim, scale=3.0), randn(seed + 20, batch, regions, dim)
    check_region(r0, r1, tau)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("groups", [[0, 1, 0, 1], [2, 2, 2, 5], [0, 0, 0, 0]])
def test_region_local_partition_groups_match_loop(seed, groups):
    r0, r1 = randn(seed, 4, 3, 4), randn(seed + 30, 4, 3, 4)
    groups = torch.tensor(groups)
    value, _ = check_region(r0, r1, 0.1, groups)
    default = loop_region_local(r0, r1, 0.1)
    assert not torch.allclose(value.double(), default, rtol=1e-3, atol=1e-3)


def test_region_local_arange_groups_equal_none():
    r0, r1 = randn(3, 3, 4, 5), randn(4, 3, 4, 5)
    loss = RegionLocalLoss(0.1)
    torch.testing.assert_close(loss(r0, r1), loss(r0, r1, torch.tensor([5, 1, 9])))


def test_region_local_one_scalar_by_hand():
    """B=1, A=2, D=2 with known cosines: every term is -log(e^a / (e^a + e^b + e^c))."""
    tau = 0.5
    r0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)     # map 0: regions e1, e2
    r1 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=F64)     # map 1: regions e1, (1,1)
    c = 1 / math.sqrt(2)
    terms = [
        # (m, n, u): s(m_u, n_u), s(m_u, m_u'), s(m_u, n_u')
        (1.0, 0.0, c),   # (0, 1, 0)
        (c, 0.0, 0.0),   # (0, 1, 1)
        (1.0, c, 0.0),   # (1, 0, 0)
        (c, c, c),       # (1, 0, 1)
    ]
    expected = sum(-math.log(math.exp(a / tau) / (math.exp(a / tau) + math.exp(b / tau) + math.exp(d / tau)))
                   for a, b, d in terms) / 4
    assert RegionLocalLoss(tau)(r0, r1).item() == pytest.approx(expected, rel=1e-5)
    assert loop_region_local(r0, r1, tau).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 0, 1])])
def test_region_local_single_region_is_zero(groups):
    r0, r1 = randn(5, 3, 1, 4), randn(6, 3, 1, 4)
    value, grads = grad_of(lambda a, b: RegionLocalLoss(0.1)(a, b, groups), r0, r1)
    assert_finite(value, grads)
    assert value.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_region_local_rejects_bad_input():
    r = randn(0, 2, 3, 4)
    with pytest.raises(ValueError):
        RegionLocalLoss(0.1)(r, r, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        RegionLocalLoss(0.1)(r, r[:, :2])
    with pytest.raises(ValueError):
        RegionLocalLoss(0.0)


# --------------------------------------------------------------------------------------------------
# 3. class_means
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_means_match_loop(seed):
    num_classes = 4
    emb = randn(seed, 3, 2, 4, 5)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, num_classes + 1, (3, 4, 5), generator=g)   # includes -1 and K (ignored)
    labels[2][labels[2] == 3] = 0                                           # class 3 absent from image 2
    means, present = class_means(emb, labels, num_classes)
    ref = loop_class_means(emb, labels, num_classes)
    assert means.shape == (3, num_classes, 2) and present.shape == (3, num_classes)
    for b in range(3):
        for k in range(num_classes):
            assert bool(present[b, k]) == (ref[b][k] is not None)
            if ref[b][k] is not None:
                torch.testing.assert_close(means[b, k].double(), ref[b][k], rtol=1e-5, atol=1e-6)
    assert not present[2, 3]


def test_class_means_ignore_negative_labels():
    emb = randn(1, 1, 3, 2, 2)
    labels = torch.tensor([[[1, 1], [-1, 0]]])
    means, present = class_means(emb, labels, 2)
    torch.testing.assert_close(means[0, 1].double(), (emb[0, :, 0, 0] + emb[0, :, 0, 1]) / 2,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(means[0, 0].double(), emb[0, :, 1, 1], rtol=1e-6, atol=1e-6)
    assert present.tolist() == [[True, True]]


# --------------------------------------------------------------------------------------------------
# 4. ClassMeanContrastLoss
# --------------------------------------------------------------------------------------------------
def check_class_mean(emb, labels, anchors, num_classes, tau=0.1, matching="intra", background_negative=False,
                     partners=None, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    loss = ClassMeanContrastLoss(temperature=tau, matching=matching, background_negative=background_negative)
    lib_value, lib_grads = grad_of(lambda e: loss(e, labels, anchors, num_classes, partners), emb)
    ref_value, ref_grads = grad_of(
        lambda e: loop_class_mean_loss(e, labels, anchors, num_classes, tau, matching, background_negative,
                                       partners=partners), emb)
    assert_matches(lib_value, ref_value, lib_grads, ref_grads, value_tol, grad_tol)
    return lib_value, lib_grads


def make_seg(seed, batch=3, channels=3, height=5, width=6, num_classes=4):
    emb = randn(seed, batch, channels, height, width)
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.randint(0, num_classes, (batch, height, width), generator=g)
    return emb, labels


def uneven_anchors(labels, classes, seed):
    """A varying number (1..4) of anchor pixels per (image, class), so the averaging order matters."""
    rng = random.Random(seed)
    flat = labels.reshape(labels.shape[0], -1)
    image, pixel, label = [], [], []
    for b in range(flat.shape[0]):
        for c in classes:
            where = [i for i in range(flat.shape[1]) if int(flat[b, i]) == c]
            if where:
                for _ in range(rng.randint(1, 4)):
                    image.append(b)
                    pixel.append(rng.choice(where))
                    label.append(c)
    return torch.tensor(image), torch.tensor(pixel), torch.tensor(label)


MATCHING_CASES = [("intra", False), ("intra", True), ("inter", False), ("inter", True)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("matching,background_negative", MATCHING_CASES)
def test_class_mean_sampled_anchors_match_loop(seed, matching, background_negative):
    emb, labels = make_seg(seed)
    anchors = sample_class_pixels(labels, [1, 2, 3], 3, torch.Generator().manual_seed(seed))
    partners = torch.tensor([1, 2, 0])
    check_class_mean(emb, labels, anchors, 4, 0.1, matching, background_negative, partners)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("matching,background_negative", MATCHING_CASES)
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_class_mean_uneven_anchors_match_loop(seed, matching, background_negative, tau):
    emb, labels = make_seg(seed, batch=3, height=4, width=5)
    labels[0][labels[0] == 3] = 2       # image 0 has classes {0, 1, 2}: classes per image differ
    anchors = uneven_anchors(labels, [1, 2, 3], seed)
    partners = torch.tensor([2, 0, 1])
    value, _ = check_class_mean(emb, labels, anchors, 4, tau, matching, background_negative, partners)
    # sensitivity: the flat mean over the valid anchors is a different number
    terms = [float(t) for values in loop_class_mean_terms(emb, labels, anchors, 4, tau, matching,
                                                           background_negative, partners=partners).values()
             for t in values]
    assert len(terms) > 0
    assert abs(value.item() - sum(terms) / len(terms)) > 1e-4


@pytest.mark.parametrize("matching", ["intra", "inter"])
def test_class_mean_matchings_and_background_differ(matching):
    emb, labels = make_seg(5)
    anchors = sample_class_pixels(labels, [1, 2, 3], 2, torch.Generator().manual_seed(5))
    partners = torch.tensor([1, 2, 0])
    values = {}
    for m in ("intra", "inter"):
        for bg in (False, True):
            values[m, bg] = ClassMeanContrastLoss(0.1, m, bg)(emb, labels, anchors, 4, partners).item()
    assert len({round(v, 4) for v in values.values()}) == 4


@pytest.mark.parametrize("matching", ["intra", "inter"])
@pytest.mark.parametrize("background_negative", [False, True])
def test_class_mean_no_foreground_is_zero(matching, background_negative):
    emb = randn(6, 2, 3, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1, 0, 0] = -1
    anchors = sample_class_pixels(labels, [1, 2], 3, torch.Generator().manual_seed(0))
    assert all(len(a) == 0 for a in anchors)
    loss = ClassMeanContrastLoss(0.1, matching, background_negative)
    value, (grad,) = grad_of(lambda e: loss(e, labels, anchors, 3, torch.tensor([1, 0])), emb)
    assert_finite(value, [grad])
    assert value.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_class_mean_single_foreground_class_image():
    """Image 0 holds background and class 1 only: skipped without a background negative, counted with it."""
    emb, labels = make_seg(7, batch=2, height=4, width=4, num_classes=3)
    labels[0] = 0
    labels[0, :2, :2] = 1
    anchors = sample_class_pixels(labels, [1, 2], 3, torch.Generator().manual_seed(7))
    assert set(anchors[0].tolist()) == {0, 1}

    without, _ = check_class_mean(emb, labels, anchors, 3, background_negative=False)
    keep = anchors[0] == 1
    only_image1 = ClassMeanContrastLoss(0.1)(emb, labels, tuple(a[keep] for a in anchors), 3)
    torch.testing.assert_close(without.double(), only_image1.detach().double(), rtol=1e-6, atol=1e-7)

    with_bg, (grad,) = check_class_mean(emb, labels, anchors, 3, background_negative=True)
    assert not torch.allclose(with_bg.double(), without.double(), rtol=1e-3, atol=1e-3)
    assert grad[0].abs().sum() > 0          # image 0 now contributes

    # every image single-class, no background negative: loss 0 with zero, finite gradient
    single = labels[:1].expand(2, 4, 4)
    value, (g0,) = grad_of(lambda e: ClassMeanContrastLoss(0.1)(e, single, anchors, 3), emb)
    assert_finite(value, [g0])
    assert value.item() == 0.0 and torch.count_nonzero(g0) == 0


@pytest.mark.parametrize("matching", ["intra", "inter"])
def test_class_mean_single_pixel_class(matching):
    emb, labels = make_seg(8, batch=2, height=4, width=5, num_classes=3)
    labels[labels == 3] = 2
    labels[0][labels[0] == 3] = 1
    labels[0][labels[0] == 2] = 1
    labels[0, 2, 3] = 2                      # the only pixel of class 2 in image 0
    anchors = sample_class_pixels(labels, [1, 2], 3, torch.Generator().manual_seed(8))
    sel = (anchors[0] == 0) & (anchors[2] == 2)
    assert sel.sum() == 3 and set(anchors[1][sel].tolist()) == {2 * 5 + 3}
    _, (grad,) = check_class_mean(emb, labels, anchors, 3, 0.1, matching, False, torch.tensor([1, 0]))
    assert torch.isfinite(grad).all()


def test_class_mean_class_absent_from_partner():
    """Inter mode: class 3 exists in image 0 only; its anchors have one positive, others two."""
    emb, labels = make_seg(9, batch=2, height=4, width=5, num_classes=4)
    labels[1][labels[1] == 3] = 1
    labels[0, 0, 0] = 3
    anchors = uneven_anchors(labels, [1, 2, 3], 9)
    assert 3 in anchors[2][anchors[0] == 0].tolist() and 3 not in anchors[2][anchors[0] == 1].tolist()
    for bg in (False, True):
        check_class_mean(emb, labels, anchors, 4, 0.2, "inter", bg, torch.tensor([1, 0]))
    # the partner is self: each class's positive counted twice, same value as intra up to the log 2 shift
    check_class_mean(emb, labels, anchors, 4, 0.2, "inter", False, torch.tensor([0, 1]))


@pytest.mark.parametrize("matching", ["intra", "inter"])
def test_class_mean_ignored_labels(matching):
    emb, labels = make_seg(10, batch=2, height=4, width=5)
    labels[0, 1:3, 1:4] = -1
    labels[1, 0, :] = -1
    anchors = sample_class_pixels(labels, [1, 2, 3], 2, torch.Generator().manual_seed(10))
    assert all(int(labels[b, p // 5, p % 5]) >= 0 for b, p in zip(anchors[0].tolist(), anchors[1].tolist()))
    value, (grad,) = check_class_mean(emb, labels, anchors, 4, 0.1, matching, True, torch.tensor([1, 0]))
    ignored = (labels == -1)
    # an ignored pixel is neither an anchor nor in a mean: no gradient reaches it
    assert torch.count_nonzero(grad.permute(0, 2, 3, 1)[ignored]) == 0
    # sensitivity: treating -1 pixels as background would change the loss
    as_bg = labels.clamp(min=0)
    other = loop_class_mean_loss(emb, as_bg, anchors, 4, 0.1, matching, True, partners=torch.tensor([1, 0]))
    assert not torch.allclose(value.double(), other, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("matching,background_negative", MATCHING_CASES)
def test_class_mean_on_volumes_matches_the_voxel_loop(matching, background_negative):
    """The voxel form: class means over every voxel of a volume, anchors indexing the flattened D*H*W."""
    emb = randn(11, 2, 3, 3, 4, 5)
    labels = torch.randint(0, 4, (2, 3, 4, 5), generator=torch.Generator().manual_seed(11))
    labels[1, 2, 3, 4] = -1  # padding: in no mean, never an anchor
    anchors = uneven_anchors(labels, [1, 2, 3], 11)
    _, (grad,) = check_class_mean(emb, labels, anchors, 4, 0.1, matching, background_negative, torch.tensor([1, 0]))
    assert torch.count_nonzero(grad[1, :, 2, 3, 4]) == 0 and torch.count_nonzero(grad[:, :, 2]) > 0


def test_class_mean_on_volumes_without_foreground_or_with_one_voxel():
    emb = randn(12, 2, 3, 2, 3, 3)
    labels = torch.zeros(2, 2, 3, 3, dtype=torch.long)
    loss = ClassMeanContrastLoss(0.1)
    for setup in (lambda: None, lambda: labels.__setitem__((0, 1, 2, 2), 1)):
        setup()  # no foreground; then one voxel of class 1 (its own class mean, no negative: skipped)
        anchors = sample_class_pixels(labels, [1, 2], 3, torch.Generator().manual_seed(0))
        value, (grad,) = grad_of(lambda e: loss(e, labels, anchors, 3), emb)
        assert_finite(value, [grad])
        assert value.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert len(anchors[0]) == 3 and set(anchors[1].tolist()) == {1 * 9 + 2 * 3 + 2}


def test_class_mean_rejects_bad_arguments():
    emb, labels = make_seg(0, batch=2)
    anchors = sample_class_pixels(labels, [1], 1)
    with pytest.raises(ValueError):
        ClassMeanContrastLoss(0.1, "inter")(emb, labels, anchors, 4)
    with pytest.raises(ValueError):
        ClassMeanContrastLoss(0.1, "inter")(emb, labels, anchors, 4, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        ClassMeanContrastLoss(0.1, "cross")
    with pytest.raises(ValueError):
        ClassMeanContrastLoss(0.1)(emb, labels[:, :-1], anchors, 4)


# --------------------------------------------------------------------------------------------------
# 5. sample_class_pixels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_class", [1, 3])
def test_sample_class_pixels(seed, per_class):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 4, (3, 5, 6), generator=g)
    labels[1][labels[1] == 2] = 0           # class 2 absent from image 1
    classes = [1, 2, 5]                     # class 5 absent everywhere
    image, pixel, label = sample_class_pixels(labels, classes, per_class, torch.Generator().manual_seed(seed))
    assert len(image) == len(pixel) == len(label)
    flat = labels.reshape(3, -1)
    counts = {}
    for b, p, c in zip(image.tolist(), pixel.tolist(), label.tolist()):
        assert int(flat[b, p]) == c
        counts[b, c] = counts.get((b, c), 0) + 1
    expected = {(b, c) for b in range(3) for c in classes if bool((flat[b] == c).any())}
    assert set(counts) == expected
    assert all(n == per_class for n in counts.values())
    assert (1, 2) not in counts and all(c != 5 for _, c in counts)
    again = sample_class_pixels(labels, classes, per_class, torch.Generator().manual_seed(seed))
    for a, b in zip((image, pixel, label), again):
        assert torch.equal(a, b)


def test_sample_class_pixels_depends_on_generator():
    labels = torch.ones(2, 8, 8, dtype=torch.long)
    draws = {tuple(sample_class_pixels(labels, [1], 5, torch.Generator().manual_seed(s))[1].tolist())
             for s in range(4)}
    assert len(draws) > 1


def test_sample_class_pixels_empty_and_invalid():
    labels = torch.zeros(2, 3, 3, dtype=torch.long)
    for out in (sample_class_pixels(labels, [1, 2], 2), sample_class_pixels(labels, [], 2)):
        assert all(len(t) == 0 and t.dtype == torch.long for t in out)
    with pytest.raises(ValueError):
        sample_class_pixels(labels, [0], 0)


# --------------------------------------------------------------------------------------------------
# 6. region_corners, region_vectors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,size", [(20, 20, 3), (32, 24, 5), (64, 64, 13), (17, 30, 4)])
def test_region_corners_large_maps(height, width, size):
    corners = region_corners((height, width), size)
    assert len(corners) == 13 and len(set(corners)) == 13
    free_h, free_w = height - size, width - size
    for top, left in corners:
        assert 0 <= top <= free_h and 0 <= left <= free_w
    # 3 x 3 grid at 0, 1/2, 1 and 2 x 2 grid at 1/4, 3/4 of the free range (to within rounding)
    fractions = [(a, b) for a in (0, .5, 1) for b in (0, .5, 1)] + \
        [(a, b) for a in (.25, .75) for b in (.25, .75)]
    for a, b in fractions:
        assert any(abs(top - a * free_h) <= 0.5 and abs(left - b * free_w) <= 0.5 for top, left in corners)
    for corner in [(0, 0), (0, free_w), (free_h, 0), (free_h, free_w)]:
        assert corner in corners


@pytest.mark.parametrize("height,width,size,count", [(3, 3, 3, 1), (4, 4, 3, 4), (3, 5, 3, 3), (5, 5, 3, 9)])
def test_region_corners_small_maps_drop_duplicates(height, width, size, count):
    corners = region_corners((height, width), size)
    assert len(corners) == len(set(corners)) == count
    for top, left in corners:
        assert 0 <= top and top + size <= height and 0 <= left and left + size <= width


@pytest.mark.parametrize("height,width", [(2, 5), (5, 2), (2, 2)])
def test_region_corners_map_too_small(height, width):
    with pytest.raises(ValueError):
        region_corners((height, width), 3)
    with pytest.raises(ValueError):
        region_vectors(torch.zeros(1, 1, height, width), 3)


@pytest.mark.parametrize("maps,channels,height,width,size",
                         [(2, 3, 9, 11, 3), (3, 2, 4, 4, 3), (1, 1, 5, 5, 5)])
def test_region_vectors_content(maps, channels, height, width, size):
    feats = randn(maps, maps, channels, height, width)
    vectors = region_vectors(feats, size)
    corners = region_corners((height, width), size)
    assert vectors.shape == (maps, len(corners), channels * size * size)
    for m in range(maps):
        for a, (top, left) in enumerate(corners):
            for c in range(channels):
                for i in range(size):
                    for j in range(size):
                        assert vectors[m, a, c * size * size + i * size + j] == feats[m, c, top + i, left + j]


@pytest.mark.parametrize("shape,size,count", [((9, 11, 10), 3, 35), ((3, 3, 3), 3, 1), ((4, 3, 5), 3, 6)])
def test_region_corners_and_vectors_in_3d(shape, size, count):
    """3 x 3 x 3 cubes at 0, 1/2, 1 of the free range along each axis, plus 2 x 2 x 2 at 1/4, 3/4."""
    corners = region_corners(shape, size)
    free = [side - size for side in shape]
    assert len(corners) == len(set(corners)) == count
    assert all(0 <= c <= f for corner in corners for c, f in zip(corner, free))
    fractions = list(itertools.product((0, .5, 1), repeat=3)) + list(itertools.product((.25, .75), repeat=3))
    for at in fractions:  # each grid point has its region (to within rounding)
        assert any(all(abs(c - a * f) <= 0.5 for c, a, f in zip(corner, at, free)) for corner in corners), at
    assert corners[0] == (0, 0, 0) and tuple(free) in corners
    feats = randn(1, 2, 2, *shape)
    vectors = region_vectors(feats, size)
    assert vectors.shape == (2, count, 2 * size ** 3)
    for m in range(2):
        for a, (z, y, x) in enumerate(corners):
            for c in range(2):
                for i, j, k in itertools.product(range(size), repeat=3):
                    assert vectors[m, a, c * size ** 3 + i * size * size + j * size + k] == feats[m, c, z + i, y + j, x + k]


# --------------------------------------------------------------------------------------------------
# 7. slice partitions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count,partitions",
                         [(c, p) for c in (4, 5, 7, 10, 13, 36) for p in range(1, 7) if c >= p])
def test_partition_slices_cover_and_invert(count, partitions):
    ranges = [partition_slices(p, count, partitions) for p in range(partitions)]
    flat = [s for r in ranges for s in r]
    assert flat == list(range(count))              # disjoint, contiguous, in order, covering
    sizes = [len(r) for r in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    for p, r in enumerate(ranges):
        for s in r:
            assert int(partition_of(s, count, partitions)) == p
    # vectorised on numpy arrays
    got = partition_of(np.arange(count), np.full(count, count), partitions)
    assert got.tolist() == [p for p, r in enumerate(ranges) for _ in r]


def test_partition_of_first_and_last():
    assert int(partition_of(0, 10, 4)) == 0 and int(partition_of(9, 10, 4)) == 3
    assert partition_of(np.array([0, 4, 9]), np.array([5, 5, 10]), 2).tolist() == [0, 1, 1]


def test_check_partitionable():
    check_partitionable({"a": 4, "b": 10}, 4)
    with pytest.raises(ValueError, match="case_thin"):
        check_partitionable({"a": 10, "case_thin": 3}, 4)
    with pytest.raises(ValueError, match="2 case"):
        check_partitionable({"x": 1, "y": 2, "z": 9}, 3)
