"""nnUNetTrainerSupConLocal: Hu et al., "Semi-supervised contrastive learning for label-efficient
medical image segmentation", MICCAI 2021 (docs/methods.md, its section).

One nnU-Net run in three stages (lengths in ``nnunet_contrast.supconlocal`` of the plans):
1. ``global``: NT-Xent (Eq. 1) on the encoder's pooled bottleneck of two spatially and
   intensity-augmented views of labelled and unlabelled images (labels unused);
2. ``local``: supervised local contrast (Eq. 2-3) on the last decoder stage of two
   intensity-only views of labelled images (block division, stride or exact; over voxels in 3D);
3. ``finetune``: nnU-Net's own supervised training on the labelled cases.
"""
import torch
from torch import nn

from nnunet_contrast.distributed import rank_tail
from nnunet_contrast.losses import NTXentLoss, SupConLocalLoss
from nnunet_contrast.network.heads import DenseProjectionHead
from nnunet_contrast.network.taps import check_unet, decoder_channels, forward_with_decoder_features
from nnunet_contrast.training.global_local import GlobalLocalPretraining
from nnunet_contrast.training.schedule import ENCODER, NETWORK, Data, Head, Stage, Term, Views
from nnunet_contrast.training.self_training import SELF_TRAINING_VARIANT
from nnunet_contrast.training.step import StepInputs


class nnUNetTrainerSupConLocal(GlobalLocalPretraining):
    presets = ("base", "supconlocal_hu2021")
    method_key = "supconlocal"
    head_names = ("global", "local")

    def build_schedule(self):
        s, adam = self.method_settings, self.pretrain_optimizer()
        iterations = self.pretrain_iterations(s.pretrain_iterations_per_epoch)
        return [
            Stage("global", s.global_epochs, iterations, (ENCODER, Head("global")), adam, (Term("global_contrast"),),
                  Data.LABELED_AND_UNLABELED, Views.SPATIAL),
            Stage("local", s.local_epochs, iterations, (NETWORK, Head("local")), adam, (Term("local_contrast"),),
                  Data.LABELED, Views.INTENSITY),
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
            "local": DenseProjectionHead(decoder_channels(self.network), s.local_head_hidden, s.local_head_dim,
                                         dims=self.patch_dims),
        })

    def global_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 1 on labelled and unlabelled images together; labels are not read."""
        return self.global_loss(*self.global_view_embeddings(inputs.views(inputs.images)))

    def local_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 2-3 on labelled images: both views keep the labels (intensity-only changes)."""
        images, labels = inputs.images, inputs.labels
        count = self.local_image_count(len(images))
        # a rank that holds none of them still runs one image, kept out of the loss, so that it joins the
        # loss's gathers with features of the right shape
        taken = max(count, 1)
        view0, view1 = inputs.views(images[-taken:])
        _, features = forward_with_decoder_features(self.network, torch.cat([view0, view1]))
        kept = torch.cat([features[taken - count:taken], features[2 * taken - count:]])
        labels = labels[len(labels) - count:]
        return self.local_loss(self.heads["local"](kept), torch.cat([labels, labels]))

    def local_image_count(self, batch_size: int) -> int:
        """The last ``local_images`` images of nnU-Net's batch are its foreground-oversampled crops; under
        DDP those of the global batch, which nnU-Net lays out over the ranks in rank order: each rank takes
        the ones that are in its part (the last ranks hold them, rank 0 maybe none)."""
        local = self.method_settings.local_images
        return min(rank_tail(self.configuration_manager.batch_size, local), batch_size) if local else batch_size


class nnUNetTrainerSupConLocalSelfTraining(nnUNetTrainerSupConLocal):
    """SupConLocal's global and local pretraining, then the self-training stage instead of nnU-Net's fine-tuning."""
    variant_settings = SELF_TRAINING_VARIANT
