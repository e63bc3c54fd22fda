"""nnUNetTrainerGlobalLocalContrast: Chaitanya et al., "Contrastive learning of global and local
features for medical image segmentation with limited annotations", NeurIPS 2020
(../shared/docs/methods.md, section 4).

One nnU-Net run in three stages (settings in ``nnunet_contrast.globallocal`` of the plans):
1. ``global``: NT-Xent on the encoder (pooled bottleneck + MLP g1) of two spatially and
   intensity-augmented views, with strategy ``GR`` (positives: the two views of a slice) or
   ``GD`` (also same-partition slices of other volumes; batches of volumes x partitions);
2. ``local``: the encoder frozen, the first ``decoder_blocks`` decoder stages and the head g2 learn
   the local loss ``LR`` or ``LD`` over 13 ``region_size`` x ``region_size`` regions of two
   intensity-only views;
3. ``finetune``: nnU-Net's own supervised training on the labelled cases.
Both pretraining stages read images of all training cases (labelled and unlabelled, labels unused)
and the added unlabelled images.
Variant: ``nnUNetTrainerGlobalContrast`` (SimCLR-style G^R pretraining only, then fine-tuning).
"""
from typing import Dict

import torch
from torch import nn

from nnunet_contrast.augment import two_views
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.heads import DenseProjectionHead, GlobalProjectionHead
from nnunet_contrast.losses import NTXentLoss, RegionLocalLoss
from nnunet_contrast.pixel_selection import region_vectors
from nnunet_contrast.semisup.slices import (PartitionDataLoader, SliceInfoDataLoader, check_partitionable,
                                            partition_of, slice_counts)
from nnunet_contrast.taps import (bottleneck_features, check_unet, decoder_block_features, decoder_block_parameters,
                                  decoder_channels, decoder_stage_count, encoder_channels, unwrap_network)
from nnunet_contrast.training.staged import FINETUNE, Stage, StagedContrastTrainer


class nnUNetTrainerGlobalLocalContrast(StagedContrastTrainer):
    presets = ("base", "globallocal_chaitanya2020")
    method_key = "globallocal"
    unlabeled_batches = False  # pretraining reads its own batches of all images

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_loaders: Dict[bool, object] = {}  # by "partition batches?"

    def pretraining_stages(self):
        s = self.method_settings
        return [Stage("global", s["global_epochs"]), Stage("local", s["local_epochs"])]

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        self.global_loss = NTXentLoss(self.method_settings["temperature"])
        self.local_loss = RegionLocalLoss(self.method_settings["temperature"])

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        blocks, available = s["decoder_blocks"], decoder_stage_count(self.network)
        if blocks > available:
            raise UserInputError(f"nnunet_contrast.globallocal.decoder_blocks is {blocks} but this network has "
                                 f"{available} decoder stages: set it to at most {available} in the plans")
        return nn.ModuleDict({
            "global": GlobalProjectionHead(encoder_channels(self.network), s["global_head_hidden"],
                                           s["global_head_dim"]),
            "local": DenseProjectionHead(decoder_channels(self.network, blocks - 1), s["local_head_hidden"],
                                         s["local_head_dim"], normalize=False),
        })

    def stage_parameters(self, stage: str):
        if stage == "global":
            encoder = unwrap_network(self.network).encoder
            return list(encoder.parameters()) + list(self.heads["global"].parameters())
        # the encoder stays frozen while the decoder blocks learn the local loss
        blocks = decoder_block_parameters(self.network, self.method_settings["decoder_blocks"])
        return blocks + list(self.heads["local"].parameters())

    # ------------------------------------------------------------ data
    def pretraining_batch(self, partitioned: bool) -> dict:
        """Images of all training cases, labels dropped: partition batches (G^D, L^D) or random slices."""
        if partitioned not in self.pretrain_loaders:
            self.pretrain_loaders[partitioned] = self.build_pretraining_loader(partitioned)
        return next(self.pretrain_loaders[partitioned])

    def build_pretraining_loader(self, partitioned: bool):
        dataset = self.all_images_dataset()
        batch_size, partitions = self.method_settings["pretrain_batch_size"], self.method_settings["partitions"]
        if not partitioned:
            return self.build_image_loader(dataset, batch_size, SliceInfoDataLoader)
        if batch_size < 2 * partitions:
            raise UserInputError(f"partition batches need at least 2 volumes: set nnunet_contrast.globallocal."
                                 f"pretrain_batch_size to at least {2 * partitions} (2 x partitions)")
        try:
            check_partitionable(slice_counts(dataset), partitions)
        except ValueError as error:
            raise UserInputError(f"{error} (nnunet_contrast.globallocal in the plans)") from None
        return self.build_image_loader(dataset, batch_size, PartitionDataLoader, partitions=partitions)

    def partition_groups(self, batch: dict) -> torch.Tensor:
        parts = partition_of(batch["slice_index"], batch["slice_count"], self.method_settings["partitions"])
        return torch.as_tensor(parts, device=self.device)

    def extra_loaders(self):
        return list(self.pretrain_loaders.values())

    def enter_stage(self, stage: str) -> None:
        super().enter_stage(stage)
        if stage == FINETUNE:  # the pretraining loaders' worker processes are no longer needed
            for loader in self.pretrain_loaders.values():
                loader.finish()
            self.pretrain_loaders.clear()

    # ------------------------------------------------------------ losses
    def contrast_loss(self, stage: str, batch: dict) -> torch.Tensor:
        # nnU-Net's labelled batch is not used: pretraining reads its own batches
        if stage == "global":
            return self.global_step_loss(self.method_settings["global_strategy"] == "GD")
        return self.local_step_loss(self.method_settings["local_strategy"] == "LD")

    def global_step_loss(self, partitioned: bool) -> torch.Tensor:
        batch = self.pretraining_batch(partitioned)
        images = batch["data"].to(self.device, non_blocking=True)
        view0, view1 = two_views(images, spatial=True)
        z = self.heads["global"](bottleneck_features(self.network, torch.cat([view0, view1])))
        return self.global_loss(*z.chunk(2), self.partition_groups(batch) if partitioned else None)

    def local_step_loss(self, partitioned: bool) -> torch.Tensor:
        s = self.method_settings
        batch = self.pretraining_batch(partitioned)
        images = batch["data"].to(self.device, non_blocking=True)
        view0, view1 = two_views(images, spatial=False)
        features = decoder_block_features(self.network, torch.cat([view0, view1]), s["decoder_blocks"],
                                          train_encoder=False)
        regions = region_vectors(self.heads["local"](features), s["region_size"])
        return self.local_loss(*regions.chunk(2), self.partition_groups(batch) if partitioned else None)


class nnUNetTrainerGlobalContrast(nnUNetTrainerGlobalLocalContrast):
    """Global-only baseline ("Global" of Hu et al. Table 1): G^R pretraining of the encoder, then
    nnU-Net fine-tuning; no local stage."""
    presets = nnUNetTrainerGlobalLocalContrast.presets + ("globalonly",)
