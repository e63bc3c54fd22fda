"""Tests of the contrastive losses against naive, loop-based implementations of the paper equations.

Every reference below is written independently of the library: plain Python loops over anchors and
pixels, one scalar torch operation per pair, no masks, no log-sum-exp tricks (computed in float64,
where exp(100) is harmless). Values AND gradients with respect to the input features are compared.

Equations (Hu et al., MICCAI 2021; docs/methods.md section 1):

* Eq. 1 (NT-Xent): L = -1/(2B) sum_i log( exp(z_i.z_j(i)/tau) / sum_{k != i} exp(z_i.z_k/tau) ).
* Eq. 2-3 (supervised local contrast), with s_ij = f_i.f_j / tau on L2-normalised features,
  anchors = non-background pixels with at least one positive P(i) = {p != i : y_p == y_i}:
  - form "supcon": l_i = -1/|P| sum_p ( s_ip - log sum_{a != i} exp(s_ia) )
  - form "paper":  l_i = -1/|P| log( sum_p exp(s_ip) / sum_{a != i} exp(s_ia) )
  The loss is the mean of l_i over the anchors.

The library computes in float32; tolerances are set for that.
"""
import pytest
import torch

from nnunet_contrast.losses import NTXentLoss, SupConLocalLoss, supcon_pixel_loss

FORMS = ("supcon", "paper")
MODES = ("full", "exact", "stride", "block")

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    """L2-normalise one vector, written out."""
    return v / torch.sqrt((v * v).sum())


def loop_ntxent(z0: torch.Tensor, z1: torch.Tensor, tau: float) -> torch.Tensor:
    batch = z0.shape[0]
    views = [_unit(z0[b]) for b in range(batch)] + [_unit(z1[b]) for b in range(batch)]
    n = 2 * batch
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        j = (i + batch) % n  # the other view of the same image
        numerator = torch.exp(torch.dot(views[i], views[j]) / tau)
        denominator = torch.zeros((), dtype=torch.float64)
        for k in range(n):
            if k != i:
                denominator = denominator + torch.exp(torch.dot(views[i], views[k]) / tau)
        total = total - torch.log(numerator / denominator)
    return total / n


def loop_supcon_sum(pixels, tau: float, form: str, background: int = 0):
    """pixels: list of (feature vector (C,), int label). Returns (sum of l_i, number of anchors)."""
    z = [_unit(f) for f, _ in pixels]
    ys = [int(y) for _, y in pixels]
    n = len(pixels)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(n):
        if ys[i] == background:
            continue
        positives = [p for p in range(n) if p != i and ys[p] == ys[i]]
        if not positives:
            continue
        sim = {}  # s_ia for a != i, one dot product per pair
        denominator = torch.zeros((), dtype=torch.float64)
        for a in range(n):
            if a != i:
                sim[a] = torch.dot(z[i], z[a]) / tau
                denominator = denominator + torch.exp(sim[a])
        if form == "supcon":
            log_denominator = torch.log(denominator)
            acc = torch.zeros((), dtype=torch.float64)
            for p in positives:
                acc = acc + (sim[p] - log_denominator)
            l_i = -acc / len(positives)
        elif form == "paper":
            numerator = torch.zeros((), dtype=torch.float64)
            for p in positives:
                numerator = numerator + torch.exp(sim[p])
            l_i = -torch.log(numerator / denominator) / len(positives)
        else:
            raise AssertionError(form)
        total = total + l_i
        count += 1
    return total, count


def loop_supcon_mean(pixels, tau, form, background=0):
    total, count = loop_supcon_sum(pixels, tau, form, background)
    return total / count if count else total * 0.0


def _valid(label: int, ignore_label) -> bool:
    return label >= 0 and (ignore_label is None or label != ignore_label)


def collect_pixels(features, labels, rows, cols, ignore_label=None):
    """Pixels (of every view) at the given rows x cols, minus negative / ignored labels."""
    out = []
    for v in range(features.shape[0]):
        for r in rows:
            for c in cols:
                y = int(labels[v, r, c])
                if _valid(y, ignore_label):
                    out.append((features[v, :, r, c], y))
    return out


def loop_module(features, labels, mode, tau, form, stride=1, block_size=16, ignore_label=None,
                background=0):
    """What SupConLocalLoss should compute, from the loops above."""
    height, width = labels.shape[-2:]
    if mode in ("full", "exact"):
        pixels = collect_pixels(features, labels, range(height), range(width), ignore_label)
        return loop_supcon_mean(pixels, tau, form, background)
    if mode == "stride":
        pixels = collect_pixels(features, labels, range(0, height, stride), range(0, width, stride),
                                ignore_label)
        return loop_supcon_mean(pixels, tau, form, background)
    assert mode == "block"
    block_losses = []
    for top in range(0, height, block_size):
        for left in range(0, width, block_size):
            rows = range(top, min(top + block_size, height))
            cols = range(left, min(left + block_size, width))
            total, count = loop_supcon_sum(collect_pixels(features, labels, rows, cols, ignore_label),
                                           tau, form, background)
            if count:
                block_losses.append(total / count)
    if not block_losses:
        return torch.zeros((), dtype=torch.float64)
    acc = torch.zeros((), dtype=torch.float64)
    for loss in block_losses:
        acc = acc + loss
    return acc / len(block_losses)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def grad_of(fn, *tensors):
    """Value of fn(*leaves) and the gradients w.r.t. fresh float64 leaf copies of ``tensors``."""
    leaves = [t.detach().clone().double().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return value.detach(), grads


def assert_matches(lib_value, ref_value, lib_grads, ref_grads, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    assert torch.isfinite(lib_value).all()
    for g in lib_grads:
        assert torch.isfinite(g).all()
    torch.testing.assert_close(lib_value.double(), ref_value.double(), **value_tol)
    for lg, rg in zip(lib_grads, ref_grads):
        torch.testing.assert_close(lg.double(), rg.double(), **grad_tol)


def make_maps(seed, views=2, channels=4, height=5, width=6, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(views, channels, height, width, generator=g, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (views, height, width), generator=g)
    return feats, labels


def check_module(features, labels, mode, form, tau=0.1, value_tol=VALUE_TOL, grad_tol=GRAD_TOL,
                 **kwargs):
    """Compare SupConLocalLoss with the loop reference in value and gradient; return lib grad."""
    params = dict(stride=2, block_size=3, chunk_size=5)
    params.update(kwargs)
    loss = SupConLocalLoss(temperature=tau, mode=mode, form=form, **params)
    lib_value, (lib_grad,) = grad_of(lambda f: loss(f, labels), features)
    ref_value, (ref_grad,) = grad_of(
        lambda f: loop_module(f, labels, mode, tau, form, stride=params["stride"],
                              block_size=params["block_size"], ignore_label=params.get("ignore_label"),
                              background=params.get("background", 0)),
        features)
    assert_matches(lib_value, ref_value, [lib_grad], [ref_grad], value_tol, grad_tol)
    return lib_value, lib_grad, ref_value


# --------------------------------------------------------------------------------------------------
# 1. NT-Xent (Eq. 1)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2, 3, 6])
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ntxent_matches_loop(batch, tau):
    torch.manual_seed(100 + batch)
    z0 = torch.randn(batch, 5, dtype=torch.float64) * 3
    z1 = torch.randn(batch, 5, dtype=torch.float64)
    lib_value, lib_grads = grad_of(NTXentLoss(temperature=tau), z0, z1)
    ref_value, ref_grads = grad_of(lambda a, b: loop_ntxent(a, b, tau), z0, z1)
    assert lib_value.ndim == 0
    assert_matches(lib_value, ref_value, lib_grads, ref_grads)


def test_ntxent_positive_is_the_same_row_of_the_other_view():
    """Sensitivity check: pairing rows differently changes Eq. 1 (the positive is row b of z1)."""
    torch.manual_seed(1)
    z0, z1 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss = NTXentLoss(0.5)
    shuffled = z1[[1, 0, 3, 2]]
    torch.testing.assert_close(loss(z0, shuffled).double(), loop_ntxent(z0, shuffled, 0.5), **VALUE_TOL)
    assert not torch.allclose(loss(z0, z1), loss(z0, shuffled))


def test_ntxent_batch_of_one_is_exactly_zero():
    torch.manual_seed(2)
    z0 = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    value = NTXentLoss(0.5)(z0, z1)
    assert torch.isfinite(value)
    assert value.item() == 0.0
    assert loop_ntxent(z0.detach(), z1.detach(), 0.5).item() == pytest.approx(0.0, abs=1e-12)
    value.backward()
    assert torch.isfinite(z0.grad).all() and torch.isfinite(z1.grad).all()
    assert torch.count_nonzero(z0.grad) == 0 and torch.count_nonzero(z1.grad) == 0


def test_ntxent_low_temperature_large_features_finite():
    torch.manual_seed(3)
    proto = torch.randn(4, 6, dtype=torch.float64)
    z0 = (proto + 1e-3 * torch.randn(4, 6, dtype=torch.float64)) * 1e4
    z1 = (proto + 1e-3 * torch.randn(4, 6, dtype=torch.float64)) * 1e4
    lib_value, lib_grads = grad_of(NTXentLoss(temperature=0.01), z0, z1)
    ref_value, ref_grads = grad_of(lambda a, b: loop_ntxent(a, b, 0.01), z0, z1)
    assert_matches(lib_value, ref_value, lib_grads, ref_grads,
                   value_tol=dict(rtol=1e-4, atol=1e-4), grad_tol=dict(rtol=1e-3, atol=1e-7))


@pytest.mark.parametrize("tau", [0.0, -0.5, float("nan")])
def test_ntxent_rejects_bad_temperature(tau):
    with pytest.raises(ValueError):
        NTXentLoss(temperature=tau)


@pytest.mark.parametrize("shapes", [((3, 4), (3, 5)), ((3, 4), (2, 4)), ((4,), (4,)), ((2, 3, 4), (2, 3, 4)),
                                    ((0, 4), (0, 4))])
def test_ntxent_rejects_bad_shapes(shapes):
    with pytest.raises(ValueError):
        NTXentLoss(0.5)(torch.randn(*shapes[0]), torch.randn(*shapes[1]))


# --------------------------------------------------------------------------------------------------
# 2. supcon_pixel_loss on flat pixels
# --------------------------------------------------------------------------------------------------
def _flat_problem(seed, n=24, channels=5, n_classes=4):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, channels, generator=g, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return feats, labels


def _flat_pixels(feats, labels):
    return [(feats[i], int(labels[i])) for i in range(len(labels))]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_pixel_loss_matches_loop(form, chunk_size, tau):
    torch.manual_seed(0)
    feats, labels = _flat_problem(seed=11)
    counts = {}

    def lib(f):
        total, n = supcon_pixel_loss(f, labels, temperature=tau, form=form, chunk_size=chunk_size)
        counts["lib"] = n
        return total

    def ref(f):
        total, n = loop_supcon_sum(_flat_pixels(f, labels), tau, form)
        counts["ref"] = n
        return total

    lib_value, lib_grads = grad_of(lib, feats)
    ref_value, ref_grads = grad_of(ref, feats)
    assert counts["lib"] == counts["ref"] > 0
    assert isinstance(counts["lib"], int)
    assert_matches(lib_value, ref_value, lib_grads, ref_grads)


@pytest.mark.parametrize("form", FORMS)
def test_pixel_loss_chunked_equals_unchunked(form):
    feats, labels = _flat_problem(seed=12, n=41)
    base_value, (base_grad,) = grad_of(lambda f: supcon_pixel_loss(f, labels, 0.2, form)[0], feats)
    for chunk_size in (1, 3, 7, 1000):
        value, (grad,) = grad_of(lambda f: supcon_pixel_loss(f, labels, 0.2, form, chunk_size=chunk_size)[0],
                                 feats)
        torch.testing.assert_close(value, base_value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, base_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_pixel_loss_forms_differ(form):
    """Sensitivity check: the two forms are different functions (so each comparison above bites)."""
    feats, labels = _flat_problem(seed=13)
    other = "paper" if form == "supcon" else "supcon"
    a = supcon_pixel_loss(feats, labels, 0.1, form)[0]
    b = loop_supcon_sum(_flat_pixels(feats, labels), 0.1, other)[0]
    assert not torch.allclose(a.double(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("form", FORMS)
def test_pixel_loss_nonzero_background_label(form):
    feats, labels = _flat_problem(seed=14)
    lib_value, lib_grads = grad_of(lambda f: supcon_pixel_loss(f, labels, 0.1, form, background=2)[0], feats)
    ref_value, ref_grads = grad_of(lambda f: loop_supcon_sum(_flat_pixels(f, labels), 0.1, form, 2)[0], feats)
    assert supcon_pixel_loss(feats, labels, 0.1, form, background=2)[1] == \
        loop_supcon_sum(_flat_pixels(feats, labels), 0.1, form, 2)[1]
    assert_matches(lib_value, ref_value, lib_grads, ref_grads)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_pixel_loss_singleton_class_is_negative_not_anchor(form, chunk_size):
    feats, labels = _flat_problem(seed=15, n_classes=3)
    labels[7] = 9  # the only pixel of class 9
    total, n = supcon_pixel_loss(feats, labels, 0.1, form, chunk_size=chunk_size)
    ref_total, ref_n = loop_supcon_sum(_flat_pixels(feats, labels), 0.1, form)
    assert n == ref_n == int((labels != 0).sum()) - 1
    lib_value, (lib_grad,) = grad_of(
        lambda f: supcon_pixel_loss(f, labels, 0.1, form, chunk_size=chunk_size)[0], feats)
    ref_value, (ref_grad,) = grad_of(lambda f: loop_supcon_sum(_flat_pixels(f, labels), 0.1, form)[0], feats)
    assert_matches(lib_value, ref_value, [lib_grad], [ref_grad])
    assert lib_grad[7].abs().sum() > 0  # still in every denominator


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("labels", [[0] * 10, [0] * 9 + [3], [0, 1, 0, 2, 0, 3, 0, 0, 0, 0]])
def test_pixel_loss_without_anchors_is_zero(form, chunk_size, labels):
    labels = torch.tensor(labels)
    feats = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    total, n = supcon_pixel_loss(feats, labels, 0.1, form, chunk_size=chunk_size)
    assert n == 0
    assert torch.isfinite(total) and total.item() == 0.0
    total.backward()
    assert feats.grad is not None and torch.count_nonzero(feats.grad) == 0


def test_pixel_loss_rejects_bad_form():
    with pytest.raises(ValueError):
        supcon_pixel_loss(torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 2]), 0.1, form="khosla")


# --------------------------------------------------------------------------------------------------
# 3. SupConLocalLoss on dense maps: pixel selection
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["full", "exact"])
def test_module_all_pixels_matches_loop(mode, form):
    feats, labels = make_maps(seed=21, views=2, channels=4, height=5, width=6, n_classes=4)
    check_module(feats, labels, mode, form, tau=0.1, chunk_size=7)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("stride", [2, 3])
def test_module_stride_matches_loop(form, stride):
    feats, labels = make_maps(seed=22, views=2, channels=3, height=7, width=9, n_classes=3)
    check_module(feats, labels, "stride", form, tau=0.2, stride=stride)


@pytest.mark.parametrize("form", FORMS)
def test_module_stride_differs_from_all_pixels(form):
    """Sensitivity check: the strided loss is not the all-pixel loss on these maps."""
    feats, labels = make_maps(seed=22, views=2, channels=3, height=7, width=9, n_classes=3)
    strided = SupConLocalLoss(0.2, mode="stride", stride=2, form=form)(feats, labels).double()
    full = loop_module(feats, labels, "full", 0.2, form)
    assert not torch.allclose(strided, full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_size", [4, 3, 2])
def test_module_block_matches_loop(form, block_size):
    # 7 x 9 maps: border blocks are smaller than block_size
    feats, labels = make_maps(seed=23, views=2, channels=3, height=7, width=9, n_classes=3)
    check_module(feats, labels, "block", form, tau=0.1, block_size=block_size)


@pytest.mark.parametrize("form", FORMS)
def test_module_block_larger_than_map_equals_full(form):
    feats, labels = make_maps(seed=24, views=2, channels=3, height=4, width=5, n_classes=3)
    check_module(feats, labels, "block", form, tau=0.1, block_size=16)
    block = SupConLocalLoss(0.1, mode="block", block_size=16, form=form)(feats, labels)
    full = SupConLocalLoss(0.1, mode="full", form=form)(feats, labels)
    torch.testing.assert_close(block, full)


@pytest.mark.parametrize("form", FORMS)
def test_module_block_averages_blocks_not_anchors(form):
    """Blocks with very different anchor counts: the mean is over blocks, and blocks span all views."""
    feats, _ = make_maps(seed=25, views=3, channels=3, height=4, width=4)
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[:, :2, :2] = torch.tensor([[1, 1], [2, 2]])   # block (0, 0): many anchors
    labels[0, 2, 3] = 1                                   # block (1, 1): one anchor per view ...
    labels[2, 3, 2] = 1                                   # ... positive only across views
    _, _, ref = check_module(feats, labels, "block", form, tau=0.1, block_size=2)
    pooled = loop_module(feats, labels, "full", 0.1, form)  # one loss over all pixels
    assert not torch.allclose(ref, pooled, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_module_accepts_labels_with_channel_axis(mode):
    feats, labels = make_maps(seed=26, height=5, width=5)
    loss = SupConLocalLoss(0.1, mode=mode, stride=2, block_size=3, chunk_size=4)
    torch.testing.assert_close(loss(feats, labels[:, None]), loss(feats, labels))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_module_drops_negative_and_ignored_labels(mode, form):
    feats, labels = make_maps(seed=27, views=2, channels=3, height=5, width=6, n_classes=3)
    labels[0, 0, 2] = -1
    labels[1, 2, 0] = -1
    labels[0, 2, 2] = 255
    labels[1, 4, 4] = 255
    labels[0, 0, 0] = 255
    dropped = [(0, 0, 2), (1, 2, 0), (0, 2, 2), (1, 4, 4), (0, 0, 0)]
    _, lib_grad, ref = check_module(feats, labels, mode, form, tau=0.1, ignore_label=255)
    for v, r, c in dropped:  # neither anchors nor negatives: no gradient at all
        assert torch.count_nonzero(lib_grad[v, :, r, c]) == 0
    # moving the dropped pixels' features must not change the loss
    moved = feats.clone()
    for v, r, c in dropped:
        moved[v, :, r, c] = 50.0 * torch.randn(3, dtype=torch.float64)
    loss = SupConLocalLoss(0.1, mode=mode, form=form, stride=2, block_size=3, chunk_size=5, ignore_label=255)
    torch.testing.assert_close(loss(moved, labels), loss(feats, labels))
    # sensitivity check: keeping the ignored pixels as negatives would give another value
    as_background = labels.clone()
    as_background[(labels == 255) | (labels < 0)] = 0
    assert not torch.allclose(ref, loop_module(feats, as_background, mode, 0.1, form, stride=2, block_size=3),
                              rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# 4. edge cases, every mode and form
# --------------------------------------------------------------------------------------------------
def _zero_loss_checks(labels, mode, form, reference=None, **kwargs):
    torch.manual_seed(31)
    feats = torch.randn(labels.shape[0], 3, *labels.shape[1:], dtype=torch.float64, requires_grad=True)
    params = dict(stride=2, block_size=3, chunk_size=4)
    params.update(kwargs)
    value = SupConLocalLoss(0.1, mode=mode, form=form, **params)(feats, labels)
    assert torch.isfinite(value)
    assert value.item() == 0.0
    assert (reference or loop_module)(feats.detach(), labels, mode, 0.1, form, stride=params["stride"],
                                      block_size=params["block_size"], ignore_label=params.get("ignore_label")).item() == 0.0
    value.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert torch.count_nonzero(feats.grad) == 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_no_foreground(mode, form):
    _zero_loss_checks(torch.zeros(2, 5, 7, dtype=torch.long), mode, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_single_foreground_pixel(mode, form):
    labels = torch.zeros(2, 5, 7, dtype=torch.long)
    labels[0, 0, 0] = 1  # on the stride grid and in the first block
    _zero_loss_checks(labels, mode, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_every_pixel_ignored(mode, form):
    labels = torch.full((2, 4, 5), -1, dtype=torch.long)
    labels[1, :2] = 255
    _zero_loss_checks(labels, mode, form, ignore_label=255)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_single_foreground_class_everywhere(mode, form):
    feats, _ = make_maps(seed=32, views=2, channels=3, height=4, width=5)
    labels = torch.ones(2, 4, 5, dtype=torch.long)
    value, _, _ = check_module(feats, labels, mode, form, tau=0.1)
    assert torch.isfinite(value)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_class_in_single_pixel(mode, form):
    feats, labels = make_maps(seed=33, views=2, channels=3, height=5, width=7, n_classes=3)
    labels[labels == 3] = 0
    labels[0, 0, 0] = 3  # only pixel of class 3: a negative, never an anchor
    value, lib_grad, _ = check_module(feats, labels, mode, form, tau=0.1)
    assert torch.isfinite(value) and value.item() != 0.0
    assert lib_grad[0, :, 0, 0].abs().sum() > 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_low_temperature_large_features(mode, form):
    """tau = 0.01 and near-identical same-class features: s_ip ~ 100 > log(float32 max) ~ 88.7."""
    g = torch.Generator().manual_seed(34)
    labels = torch.randint(0, 3, (2, 5, 7), generator=g)
    prototypes = torch.randn(3, 4, generator=g, dtype=torch.float64)
    feats = prototypes[labels].permute(0, 3, 1, 2) + 1e-3 * torch.randn(2, 4, 5, 7, generator=g,
                                                                        dtype=torch.float64)
    feats = feats * 1e4
    value, lib_grad, _ = check_module(feats, labels, mode, form, tau=0.01,
                                      value_tol=dict(rtol=1e-4, atol=1e-4),
                                      grad_tol=dict(rtol=1e-3, atol=1e-8))
    assert torch.isfinite(value) and torch.isfinite(lib_grad).all()


# --------------------------------------------------------------------------------------------------
# 4b. voxel form (3D maps): a loop over voxels and cubes
# --------------------------------------------------------------------------------------------------
def collect_voxels(features, labels, depths, rows, cols, ignore_label=None):
    """Voxels (of every view) at depths x rows x cols, minus negative / ignored labels."""
    return [(features[v, :, d, r, c], int(labels[v, d, r, c])) for v in range(features.shape[0])
            for d in depths for r in rows for c in cols if _valid(int(labels[v, d, r, c]), ignore_label)]


def loop_module_3d(features, labels, mode, tau, form, stride=1, block_size=16, ignore_label=None):
    """What SupConLocalLoss should compute on (V, C, D, H, W) maps: blocks are block_size^3 cubes."""
    depth, height, width = labels.shape[-3:]
    if mode in ("full", "exact", "stride"):
        step = stride if mode == "stride" else 1
        pixels = collect_voxels(features, labels, range(0, depth, step), range(0, height, step),
                                range(0, width, step), ignore_label)
        return loop_supcon_mean(pixels, tau, form)
    cube_losses = []
    for front in range(0, depth, block_size):
        for top in range(0, height, block_size):
            for left in range(0, width, block_size):
                voxels = collect_voxels(features, labels, range(front, min(front + block_size, depth)),
                                        range(top, min(top + block_size, height)),
                                        range(left, min(left + block_size, width)), ignore_label)
                total, count = loop_supcon_sum(voxels, tau, form)
                if count:
                    cube_losses.append(total / count)
    return sum(cube_losses, torch.zeros((), dtype=torch.float64)) / max(len(cube_losses), 1)


def make_volumes(seed, views=2, channels=3, shape=(3, 5, 4), n_classes=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(views, channels, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, n_classes, (views, *shape), generator=g))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode, kwargs", [("full", {}), ("exact", {"chunk_size": 7}), ("stride", {"stride": 2}),
                                          ("block", {"block_size": 2}), ("block", {"block_size": 3})])
def test_module_on_volumes_matches_the_voxel_loop(mode, kwargs, form):
    # 3 x 5 x 4 maps: border cubes are smaller than block_size; a voxel ignored, one padded
    feats, labels = make_volumes(seed=41)
    labels[0, 1, 2, 3], labels[1, 0, 0, 0] = 255, -1
    params = {"stride": 2, "block_size": 3, "chunk_size": 5, **kwargs}
    loss = SupConLocalLoss(0.1, mode=mode, form=form, ignore_label=255, **params)
    lib_value, lib_grads = grad_of(lambda f: loss(f, labels[:, None]), feats)
    ref_value, ref_grads = grad_of(lambda f: loop_module_3d(f, labels, mode, 0.1, form, params["stride"],
                                                            params["block_size"], ignore_label=255), feats)
    assert_matches(lib_value, ref_value, lib_grads, ref_grads)
    assert torch.count_nonzero(lib_grads[0][0, :, 1, 2, 3]) == 0 and lib_value.abs() > 0


def test_cubes_are_not_the_squares_of_each_slice():
    """Sensitivity check: a cube pools voxels of neighbouring slices, which 2D blocks of each slice do not."""
    feats, labels = make_volumes(seed=42, shape=(2, 4, 4))
    cubes = SupConLocalLoss(0.1, mode="block", block_size=2)(feats, labels)
    slices = SupConLocalLoss(0.1, mode="block", block_size=2)(feats[:, :, 0], labels[:, 0])
    assert not torch.allclose(cubes, slices, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", MODES)
def test_edge_volumes_without_foreground_or_with_one_voxel(mode, form):
    labels = torch.zeros(2, 3, 4, 5, dtype=torch.long)
    _zero_loss_checks(labels, mode, form, loop_module_3d)
    labels[1, 0, 0, 0] = 2  # one voxel of a class: no positive, no anchor
    _zero_loss_checks(labels, mode, form, loop_module_3d)


# --------------------------------------------------------------------------------------------------
# 5. input validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(mode="pixels"), dict(mode="Block"), dict(form="khosla"), dict(form=None),
    dict(temperature=0.0), dict(temperature=-0.1), dict(temperature=float("nan")),
    dict(stride=0), dict(stride=-2), dict(stride=2.5), dict(block_size=0), dict(chunk_size=0),
])
def test_module_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SupConLocalLoss(**kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shapes", [
    ((2, 3, 4, 5), (2, 4, 6)),       # spatial mismatch
    ((2, 3, 4, 5), (3, 4, 5)),       # view mismatch
    ((2, 3, 4, 5), (2, 20)),         # flat labels
    ((3, 4, 5), (3, 4, 5)),          # 3-D features
    ((2, 3, 4, 5, 6, 2), (2, 4, 5, 6, 2)),  # 4 spatial axes
    ((2, 3, 4, 5, 6), (2, 4, 5, 7)),  # 3-D maps, spatial mismatch
    ((2, 3, 4, 5), (2, 1, 4, 6)),    # channel-axis labels, spatial mismatch
])
def test_module_rejects_bad_shapes(mode, shapes):
    loss = SupConLocalLoss(0.1, mode=mode)
    with pytest.raises(ValueError):
        loss(torch.randn(*shapes[0]), torch.zeros(*shapes[1], dtype=torch.long))


@pytest.mark.parametrize("mode", MODES)
def test_module_rejects_multichannel_labels(mode):
    loss = SupConLocalLoss(0.1, mode=mode)
    labels = torch.zeros(2, 3, 4, 5, dtype=torch.long)  # e.g. one-hot labels, K = 3
    labels[:, 1] = 1
    with pytest.raises(ValueError):
        loss(torch.randn(2, 3, 4, 5), labels)
