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
from nnunet_contrast.heads import DenseProjectionHead
from nnunet_contrast.losses import NTXentLoss, RegionLocalLoss
from nnunet_contrast.pixel_selection import region_vectors
from nnunet_contrast.semisup.slices import (PartitionDataLoader, SliceInfoDataLoader, check_partitionable,
                                            partition_of, slice_counts)
from nnunet_contrast.taps import (check_unet, decoder_block_features, decoder_block_parameters, decoder_channels,
                                  decoder_stage_count)
from nnunet_contrast.training.global_local import GlobalLocalPretraining
from nnunet_contrast.training.staged import FINETUNE


class nnUNetTrainerGlobalLocalContrast(GlobalLocalPretraining):
    presets = ("base", "globallocal_chaitanya2020")
    method_key = "globallocal"
    unlabeled_batches = False  # pretraining reads its own batches of all images

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_loaders: Dict[bool, object] = {}  # by "partition batches?"
        self.dataloader_labeled = None

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        self.global_loss = NTXentLoss(self.method_settings["temperature"])
        self.local_loss = RegionLocalLoss(self.method_settings["temperature"])

    def build_heads(self) -> nn.ModuleDict:
        heads = nn.ModuleDict({"global": self.global_head()})
        if "local" in self.stage_names():  # a run without a local stage ignores its settings
            s = self.method_settings
            blocks, available = s["decoder_blocks"], decoder_stage_count(self.network)
            if blocks > available:
                raise UserInputError(f"nnunet_contrast.globallocal.decoder_blocks is {blocks} but this network has "
                                     f"{available} decoder stages: set it to at most {available} in the plans")
            heads["local"] = DenseProjectionHead(decoder_channels(self.network, blocks - 1), s["local_head_hidden"],
                                                 s["local_head_dim"], normalize=False)
        return heads

    def stage_parameters(self, stage: str):
        if stage == "global":
            return self.global_stage_parameters()
        # the encoder stays frozen while the decoder blocks learn the local loss
        blocks = decoder_block_parameters(self.network, self.method_settings["decoder_blocks"])
        return blocks + list(self.heads["local"].parameters())

    # ------------------------------------------------------------ data
    def is_partitioned(self, stage: str) -> bool:
        """Whether the stage's batches are partition batches (G^D, L^D) rather than random slices."""
        strategy = {"global": "global_strategy", "local": "local_strategy"}[stage]
        return self.method_settings[strategy] in ("GD", "LD")

    def get_dataloaders(self):
        loaders = super().get_dataloaders()
        self.dataloader_labeled = loaders[0]
        return loaders

    def stage_loader(self, stage: str):
        """nnU-Net's labelled loader for fine-tuning; for pretraining, a loader of images of all
        training cases and the added unlabelled images, labels dropped (built once, on first use)."""
        if stage == FINETUNE:
            return self.dataloader_labeled
        partitioned = self.is_partitioned(stage)
        if partitioned not in self.pretrain_loaders:
            self.pretrain_loaders[partitioned] = self.build_pretraining_loader(partitioned)
        return self.pretrain_loaders[partitioned]

    def build_pretraining_loader(self, partitioned: bool):
        dataset = self.all_images_dataset()
        batch_size, partitions = self.method_settings["pretrain_batch_size"], self.method_settings["partitions"]
        if not partitioned:
            return self.build_image_loader(dataset, batch_size, SliceInfoDataLoader)
        where = "nnunet_contrast.globallocal in the plans"
        if batch_size < 2 * partitions:  # a single volume per batch would leave G^D / L^D without negatives
            raise UserInputError(f"partition batches need at least 2 volumes: set pretrain_batch_size "
                                 f"({batch_size}) to at least {2 * partitions}, 2 x partitions ({where})")
        try:
            check_partitionable(slice_counts(dataset), partitions)
            return self.build_image_loader(dataset, batch_size, PartitionDataLoader, partitions=partitions)
        except ValueError as error:  # too few slices per volume, too few volumes, not a multiple of partitions
            raise UserInputError(f"{error} ({where})") from None

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        # nnU-Net's loop draws the step's batch from dataloader_train: the current stage's loader
        self.dataloader_train = self.stage_loader(self.current_stage)

    def partition_groups(self, batch: dict) -> torch.Tensor:
        parts = partition_of(batch["slice_index"], batch["slice_count"], self.method_settings["partitions"])
        return torch.as_tensor(parts, device=self.device)

    def extra_loaders(self):
        return list(self.pretrain_loaders.values())

    def enter_stage(self, stage: str) -> None:
        super().enter_stage(stage)
        # the worker processes of pretraining loaders the new stage does not read are no longer needed
        needed = self.is_partitioned(stage) if stage != FINETUNE else None
        for partitioned in [p for p in self.pretrain_loaders if p != needed]:
            self.pretrain_loaders.pop(partitioned).finish()

    def on_train_end(self):
        self.dataloader_train = self.dataloader_labeled  # what nnU-Net shuts down
        super().on_train_end()

    # ------------------------------------------------------------ losses
    def contrast_loss(self, stage: str, batch: dict) -> torch.Tensor:
        """``batch``: images of the stage's loader, with slice positions; no labels."""
        groups = self.partition_groups(batch) if self.is_partitioned(stage) else None
        images = batch["data"].to(self.device, non_blocking=True)
        if stage == "global":
            return self.global_step_loss(images, groups)
        return self.local_step_loss(images, groups)

    def global_step_loss(self, images: torch.Tensor, groups) -> torch.Tensor:
        return self.global_loss(*self.global_view_embeddings(images), groups)

    def local_step_loss(self, images: torch.Tensor, groups) -> torch.Tensor:
        s = self.method_settings
        view0, view1 = two_views(images, spatial=False)
        features = decoder_block_features(self.network, torch.cat([view0, view1]), s["decoder_blocks"],
                                          train_encoder=False)
        regions = region_vectors(self.heads["local"](features), s["region_size"])
        return self.local_loss(*regions.chunk(2), groups)


class nnUNetTrainerGlobalContrast(nnUNetTrainerGlobalLocalContrast):
    """Global-only baseline ("Global" of Hu et al. Table 1): SimCLR (G^R) pretraining of the
    encoder, then nnU-Net fine-tuning; no local stage."""
    variant_settings = {"globallocal": {"global_strategy": "GR", "local_epochs": 0}}
