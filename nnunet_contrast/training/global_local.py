"""The pretraining plan Hu et al. 2021 and Chaitanya et al. 2020 share: a ``global`` stage (the
encoder and an MLP head, h1 / g1, learn NT-Xent on two spatial views of images, pooled bottleneck),
then a ``local`` stage (decoder and a dense head, h2 / g2, learn a local loss), then fine-tuning."""
from typing import List, Tuple

import torch

from nnunet_contrast.augment import two_views
from nnunet_contrast.heads import GlobalProjectionHead
from nnunet_contrast.taps import bottleneck_features, encoder_channels, unwrap_network
from nnunet_contrast.training.staged import Stage, StagedContrastTrainer


class GlobalLocalPretraining(StagedContrastTrainer):
    """Method settings used here: ``global_epochs``, ``local_epochs``, ``global_head_hidden``,
    ``global_head_dim``. Subclasses put ``global_head()`` in their heads under ``"global"``."""

    def pretraining_stages(self) -> List[Stage]:
        s = self.method_settings
        return [Stage("global", s["global_epochs"]), Stage("local", s["local_epochs"])]

    def global_head(self) -> GlobalProjectionHead:
        s = self.method_settings
        return GlobalProjectionHead(encoder_channels(self.network), s["global_head_hidden"], s["global_head_dim"])

    def global_stage_parameters(self) -> List[torch.nn.Parameter]:
        encoder = unwrap_network(self.network).encoder
        return list(encoder.parameters()) + list(self.heads["global"].parameters())

    def global_view_embeddings(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z0, z1), each (B, D): two spatial views of ``images`` through the encoder and the global head."""
        view0, view1 = two_views(images, spatial=True)
        z = self.heads["global"](bottleneck_features(self.network, torch.cat([view0, view1])))
        return z.chunk(2)
