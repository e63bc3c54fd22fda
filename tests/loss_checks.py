"""Shared checks of a loss against its loop reference: float64 leaves, values and gradients."""
import torch

VALUE_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
F64 = torch.float64


def grad_of(fn, *tensors):
    """Value of fn(*leaves) and the gradients w.r.t. fresh float64 leaf copies of ``tensors``
    (zeros for a leaf the value does not depend on)."""
    leaves = [t.detach().clone().to(F64).requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    if not value.requires_grad:  # a loop reference with no term: a constant 0
        return value.detach(), [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return value.detach(), grads


def assert_finite(value, grads=()):
    assert torch.isfinite(value).all()
    for g in grads:
        assert torch.isfinite(g).all()


def assert_matches(lib_value, ref_value, lib_grads, ref_grads, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    assert lib_value.ndim == 0
    assert_finite(lib_value, lib_grads)
    torch.testing.assert_close(lib_value.double(), ref_value.double(), **value_tol)
    assert len(lib_grads) == len(ref_grads)
    for lg, rg in zip(lib_grads, ref_grads):
        torch.testing.assert_close(lg.double(), rg.double(), **grad_tol)


def randn(seed, *shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale
