"""nnUNetTrainerSupConLocal: Hu et al., "Semi-supervised contrastive learning for label-efficient
medical image segmentation", MICCAI 2021 (../shared/docs/methods.md, section 1).

One nnU-Net run in three stages (lengths in ``nnunet_contrast.supconlocal`` of the plans):
1. ``global``: NT-Xent (Eq. 1) on the encoder's pooled bottleneck of two spatially and
   intensity-augmented views of labelled and unlabelled images (labels unused);
2. ``local``: supervised local contrast (Eq. 2-3) on the last decoder stage of two
   intensity-only views of labelled images (block division, stride or exact);
3. ``finetune``: nnU-Net's own supervised training on the labelled cases.
"""
import torch
from torch import nn

from nnunet_contrast.augment import two_views
from nnunet_contrast.heads import DenseProjectionHead
from nnunet_contrast.losses import NTXentLoss, SupConLocalLoss
from nnunet_contrast.taps import check_unet, decoder_channels, forward_with_decoder_features
from nnunet_contrast.training.global_local import GlobalLocalPretraining


class nnUNetTrainerSupConLocal(GlobalLocalPretraining):
    presets = ("base", "supconlocal_hu2021")
    method_key = "supconlocal"

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        s = self.method_settings
        self.global_loss = NTXentLoss(s["global_temperature"])
        self.local_loss = SupConLocalLoss(s["local_temperature"], s["local_mode"], s["stride"], s["block_size"],
                                          s["local_form"], ignore_label=self.label_manager.ignore_label,
                                          chunk_size=s["chunk_size"])

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({
            "global": self.global_head(),
            "local": DenseProjectionHead(decoder_channels(self.network), s["local_head_hidden"],
                                         s["local_head_dim"]),
        })

    def stage_parameters(self, stage: str):
        if stage == "global":
            return self.global_stage_parameters()
        return list(self.network.parameters()) + list(self.heads["local"].parameters())

    def contrast_loss(self, stage: str, batch: dict) -> torch.Tensor:
        return self.global_step_loss(batch) if stage == "global" else self.local_step_loss(batch)

    def global_step_loss(self, batch: dict) -> torch.Tensor:
        """Eq. 1 on labelled and unlabelled images together; labels are not read."""
        return self.global_loss(*self.global_view_embeddings(self.labeled_and_unlabeled_images(batch)))

    def local_step_loss(self, batch: dict) -> torch.Tensor:
        """Eq. 2-3 on labelled images: both views keep the labels (intensity-only changes)."""
        # the last images of nnU-Net's batch are its foreground-oversampled crops: take those
        first = -self.method_settings["local_images"] if self.method_settings["local_images"] else 0
        images = batch["data"][first:].to(self.device, non_blocking=True)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        target = target[first:].to(self.device, non_blocking=True)
        view0, view1 = two_views(images, spatial=False)
        _, features = forward_with_decoder_features(self.network, torch.cat([view0, view1]))
        return self.local_loss(self.heads["local"](features), torch.cat([target, target]))
