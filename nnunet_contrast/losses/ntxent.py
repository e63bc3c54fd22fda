"""NT-Xent, the global contrastive loss of SimCLR (Chen et al. 2020) as used by Hu et al. 2021, Eq. 1.

    L_g = -1/|A| sum_{i in A} log( exp(z_i . z_j(i) / tau) / sum_{k != i} exp(z_i . z_k / tau) )

``A`` holds the 2B views of a batch of B images; ``j(i)`` is the other view of the same image.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process, keeping the gradient of the local part."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy over two views.

    Args:
        temperature: ``tau`` in Eq. 1; must be > 0 (Hu et al.'s code: 0.5).
        gather_distributed: when torch.distributed is initialised, use the views of every process
            as negatives (anchors stay local), as in lightly's NTXentLoss.

    Shapes:
        z0, z1: (B, D) embeddings of the first and second view; row b of both comes from image b.
        They are L2-normalised here. Returns a float32 scalar.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NTXentLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z0.device.type, enabled=False):  # float32 under AMP
            return self._loss(z0, z1)

    def _loss(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        if z0.ndim != 2 or z0.shape != z1.shape:
            raise ValueError(f"NTXentLoss: expected two (B, D) tensors of equal shape, got "
                             f"{tuple(z0.shape)} and {tuple(z1.shape)}")
        if z0.shape[0] == 0:
            raise ValueError("NTXentLoss: the batch is empty")
        z0 = F.normalize(z0.float(), dim=1)
        z1 = F.normalize(z1.float(), dim=1)
        batch = z0.shape[0]
        offset, all0, all1 = 0, z0, z1
        if self.gather_distributed and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            all0, all1 = _gather_with_grad(z0), _gather_with_grad(z1)
            offset = dist.get_rank() * batch
        total = all0.shape[0]
        anchors = torch.cat([z0, z1], dim=0)                        # (2B, D)
        candidates = torch.cat([all0, all1], dim=0)                 # (2BW, D)
        logits = anchors @ candidates.T / self.temperature          # (2B, 2BW)
        local = torch.arange(batch, device=z0.device) + offset
        self_index = torch.cat([local, local + total])
        positive_index = torch.cat([local + total, local])
        rows = torch.arange(2 * batch, device=z0.device)
        logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z0.device))
        return F.cross_entropy(logits, positive_index)
