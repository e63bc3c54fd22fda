"""Losses that contrast over the batch, on 2 CPU processes (gloo): each rank holds half of a global batch;
after ``average_gradients`` every parameter's gradient, and the ranks' mean loss, equal those of one process
on the whole batch (issue 15)."""
import torch
from torch import nn

from distributed_harness import rows_of_rank, run_ranks
from nnunet_contrast.distributed import average_gradients, gather, gather_with_grad, global_mean
from nnunet_contrast.losses import NTXentLoss, SupConLocalLoss
from nnunet_contrast.losses.masked_segmentation import EXCLUDED, MaskedSegmentationLoss

TOLERANCE = 1e-5


def projection(channels: int = 6, dim: int = 16) -> nn.Module:
    torch.manual_seed(3)  # the same weights on every rank and in the reference
    return nn.Conv2d(channels, dim, 1)


def global_batch():
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(8, 6, 8, 8, generator=generator)
    views = images + 0.3 * torch.randn(images.shape, generator=generator)
    labels = torch.randint(0, 3, (8, 8, 8), generator=generator)
    labels[5:, :4] = 255  # ignored pixels on rank 1 only: the ranks select different numbers of pixels
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])  # G^D partitions: positives across ranks, uneven counts
    return images, views, labels, groups


LOSSES = {
    "ntxent": lambda net, x, v, y, g: NTXentLoss(0.5)(net(x).mean((2, 3)), net(v).mean((2, 3))),
    "ntxent_groups": lambda net, x, v, y, g: NTXentLoss(0.1)(net(x).mean((2, 3)), net(v).mean((2, 3)), g),
    "supcon_block": lambda net, x, v, y, g: SupConLocalLoss(0.1, "block", block_size=4, ignore_label=255)(net(x), y),
    "supcon_stride": lambda net, x, v, y, g: SupConLocalLoss(0.1, "stride", stride=2, ignore_label=255)(net(x), y),
    "supcon_exact": lambda net, x, v, y, g: SupConLocalLoss(0.1, "exact", chunk_size=16, ignore_label=255,
                                                           form="paper")(net(x), y),
}


def loss_and_gradients(name: str, rank: int = 0, world: int = 1):
    net = projection()
    parts = [rows_of_rank(t, rank, world) for t in global_batch()]
    loss = LOSSES[name](net, *parts)
    loss.backward()
    average_gradients(net.parameters())
    return loss.item(), [p.grad.clone() for p in net.parameters()]


def ranks_of_every_loss(rank: int, world: int):
    return {name: loss_and_gradients(name, rank, world) for name in LOSSES}


def test_gathered_losses_equal_one_process_on_the_global_batch(tmp_path):
    ranks = run_ranks(ranks_of_every_loss, tmp_path)
    for name in LOSSES:
        reference_loss, reference_grads = loss_and_gradients(name)
        mean_loss = sum(r[name][0] for r in ranks) / len(ranks)
        assert abs(mean_loss - reference_loss) < TOLERANCE, name
        for grads in (r[name][1] for r in ranks):
            for got, expected in zip(grads, reference_grads):
                assert torch.allclose(got, expected, atol=TOLERANCE), (name, (got - expected).abs().max())
        # the two ranks really saw different halves: their own losses differ
        assert ranks[0][name][0] != ranks[1][name][0], name


def gather_pieces(rank: int, world: int):
    x = torch.arange(3 * (rank + 1), dtype=torch.float32).reshape(rank + 1, 3).requires_grad_(True)
    gathered = gather_with_grad(x)
    (gathered * torch.arange(1, len(gathered) + 1)[:, None]).sum().backward()
    nothing = global_mean(torch.zeros((), requires_grad=True), 0)
    return gathered.detach(), gather(torch.tensor([rank] * (rank + 1))), x.grad, float(nothing)


def test_gather_concatenates_uneven_rows_in_rank_order_and_returns_every_ranks_gradient(tmp_path):
    (rows0, ids0, grad0, zero0), (rows1, ids1, grad1, _) = run_ranks(gather_pieces, tmp_path)
    assert torch.equal(rows0, rows1) and rows0.shape == (3, 3)
    assert ids0.tolist() == [0, 1, 1] == ids1.tolist()
    # rows are weighted 1, 2, 3 on both ranks: each row's gradient is the sum over the 2 ranks' losses
    assert grad0.tolist() == [[2.0] * 3] and grad1.tolist() == [[4.0] * 3, [6.0] * 3]
    assert zero0 == 0.0  # no term anywhere: an exact 0, not NaN


def sparse_gradients(rank: int, world: int):
    both, one, none = (nn.Parameter(torch.ones(2)) for _ in range(3))
    loss = both.sum() * (rank + 1) + (one.sum() if rank == 0 else 0.0)
    loss.backward()
    average_gradients([both, one, none])
    return both.grad, one.grad, none.grad


def test_averaged_gradients_keep_none_where_no_rank_reached_a_parameter(tmp_path):
    for both, one, none in run_ranks(sparse_gradients, tmp_path):
        assert both.tolist() == [1.5, 1.5] and one.tolist() == [0.5, 0.5]
        assert none is None  # as on one process: no weight decay, no optimizer state for it


def masked_loss_without_kept_pixels_on_rank_1(rank: int, world: int):
    generator = torch.Generator().manual_seed(rank)
    logits = torch.randn(2, 3, 8, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8), generator=generator)
    if rank == 1:
        labels[:] = EXCLUDED  # the teacher kept no pixel of this rank's images
    loss = MaskedSegmentationLoss(batch_dice=True, ddp=True)(logits, labels)
    loss.backward()
    return loss.detach(), logits.grad


def test_a_rank_without_any_kept_pixel_still_takes_part_in_the_gathered_dice(tmp_path):
    (loss0, grad0), (loss1, grad1) = run_ranks(masked_loss_without_kept_pixels_on_rank_1, tmp_path)
    assert torch.isfinite(loss0) and torch.isfinite(loss1) and grad0.abs().sum() > 0
    # rank 1's pixels carry no target: its images get no gradient, and its loss is the gathered Dice alone
    assert torch.all(grad1 == 0)


def test_rank_tail_gives_each_rank_its_part_of_the_global_batchs_last_items(monkeypatch):
    import nnunet_contrast.distributed as distributed

    def on_ranks(world, function):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        results = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            results.append(function())
        return results

    assert on_ranks(1, lambda: distributed.rank_tail(16, 8)) == [8]
    assert on_ranks(2, lambda: distributed.rank_tail(16, 8)) == [0, 8]  # the oversampled crops are rank 1's
    assert on_ranks(2, lambda: distributed.rank_tail(16, 12)) == [4, 8]
    assert on_ranks(3, lambda: distributed.rank_sizes(5)) == [[2, 2, 1]] * 3  # nnU-Net's split: first ranks + 1
    assert on_ranks(3, lambda: distributed.rank_tail(5, 2)) == [0, 1, 1]
    assert on_ranks(2, lambda: distributed.rank_tail(4, 9)) == [2, 2]  # more than the batch: all of it
    assert on_ranks(2, lambda: distributed.rank_share(5)) == [3, 2]
