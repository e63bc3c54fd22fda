"""nnUNetTrainerSupConLocal: Hu et al., "Semi-supervised contrastive learning for label-efficient
medical image segmentation", MICCAI 2021 (docs/methods.md, its section).

One nnU-Net run in three stages (lengths in ``nnunet_contrast.supconlocal`` of the plans):
1. ``global``: NT-Xent (Eq. 1) on the encoder's pooled bottleneck of two spatially and
   intensity-augmented views of labelled and unlabelled images (labels unused);
2. ``local``: supervised local contrast (Eq. 2-3) on the last decoder stage of two
   intensity-only views of labelled images (block division, stride or exact);
3. ``finetune``: nnU-Net's own supervised training on the labelled cases.
"""
import torch
from torch import nn

from nnunet_contrast.distributed import rank_share, world_size
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.losses import NTXentLoss, SupConLocalLoss
from nnunet_contrast.network.heads import DenseProjectionHead
from nnunet_contrast.network.taps import check_unet, decoder_channels, forward_with_decoder_features
from nnunet_contrast.training.global_local import GlobalLocalPretraining
from nnunet_contrast.training.schedule import (ENCODER, INTENSITY, LABELED, LABELED_AND_UNLABELED, NETWORK, SPATIAL,
                                               Stage, Term)
from nnunet_contrast.training.self_training import SELF_TRAINING_VARIANT
from nnunet_contrast.training.step import StepInputs


class nnUNetTrainerSupConLocal(GlobalLocalPretraining):
    presets = ("base", "supconlocal_hu2021")
    method_key = "supconlocal"

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict):
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        images = settings.method.local_images
        if 0 < images < world_size():
            raise UserInputError(f"supconlocal.local_images ({images}) is split over the {world_size()} GPUs: "
                                 f"set it to 0 (all images) or to at least {world_size()} in the plans")
        return settings

    def build_schedule(self):
        s, adam = self.method_settings, self.pretrain_optimizer()
        iterations = self.pretrain_iterations(s.pretrain_iterations_per_epoch)
        return [
            Stage("global", s.global_epochs, iterations, (ENCODER, "head:global"), adam, (Term("global_contrast"),),
                  LABELED_AND_UNLABELED, SPATIAL),
            Stage("local", s.local_epochs, iterations, (NETWORK, "head:local"), adam, (Term("local_contrast"),),
                  LABELED, INTENSITY),
            self.nnunet_finetune_stage(),
        ]

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        s = self.method_settings
        self.global_loss = NTXentLoss(s.global_temperature)
        self.local_loss = SupConLocalLoss(s.local_temperature, s.local_mode, s.stride, s.block_size, s.local_form,
                                          ignore_label=self.label_manager.ignore_label, chunk_size=s.chunk_size)

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({
            "global": self.global_head(),
            "local": DenseProjectionHead(decoder_channels(self.network), s.local_head_hidden, s.local_head_dim),
        })

    def global_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 1 on labelled and unlabelled images together; labels are not read."""
        return self.global_loss(*self.global_view_embeddings(inputs.views(inputs.images)))

    def local_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 2-3 on labelled images: both views keep the labels (intensity-only changes)."""
        # the last images of nnU-Net's batch are its foreground-oversampled crops: take those (under DDP
        # each rank its share of them, from its own batch)
        first = -rank_share(self.method_settings.local_images) if self.method_settings.local_images else 0
        images = inputs.batch["data"][first:].to(self.device, non_blocking=True)
        target = inputs.batch["target"][0] if isinstance(inputs.batch["target"], list) else inputs.batch["target"]
        target = target[first:].to(self.device, non_blocking=True)
        view0, view1 = inputs.views(images)
        _, features = forward_with_decoder_features(self.network, torch.cat([view0, view1]))
        return self.local_loss(self.heads["local"](features), torch.cat([target, target]))


class nnUNetTrainerSupConLocalSelfTraining(nnUNetTrainerSupConLocal):
    """SupConLocal's global and local pretraining, then the self-training stage instead of nnU-Net's fine-tuning."""
    variant_settings = SELF_TRAINING_VARIANT
