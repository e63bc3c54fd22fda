"""The pretraining plan Hu et al. 2021 and Chaitanya et al. 2020 share: a ``global`` stage (the
encoder and an MLP head, h1 / g1, learn NT-Xent on two spatial views of images, pooled bottleneck),
then a ``local`` stage (decoder and a dense head, h2 / g2, learn a local loss), then fine-tuning."""
from typing import Tuple

import torch

from nnunet_contrast.network.heads import GlobalProjectionHead
from nnunet_contrast.network.taps import bottleneck_features, encoder_channels
from nnunet_contrast.training.method import MethodTrainer
from nnunet_contrast.training.schedule import Adam


class GlobalLocalPretraining(MethodTrainer):
    """Method settings used here: ``global_head_hidden``, ``global_head_dim``, ``pretrain_lr``,
    ``pretrain_weight_decay``, ``pretrain_iterations_per_epoch``. Subclasses put ``global_head()`` in
    their heads under ``"global"``."""

    def pretrain_optimizer(self) -> Adam:
        s = self.method_settings
        return Adam(s.pretrain_lr, s.pretrain_weight_decay)

    def global_head(self) -> GlobalProjectionHead:
        s = self.method_settings
        return GlobalProjectionHead(encoder_channels(self.network), s.global_head_hidden, s.global_head_dim)

    def global_view_embeddings(self, views: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z0, z1), each (B, D): two views of images through the encoder and the global head."""
        z = self.heads["global"](bottleneck_features(self.network, torch.cat(views)))
        return z.chunk(2)
