"""nnUNetTrainerGlobalLocalContrast: Chaitanya et al., "Contrastive learning of global and local
features for medical image segmentation with limited annotations", NeurIPS 2020
(docs/methods.md, its section).

One nnU-Net run in three stages (settings in ``nnunet_contrast.globallocal`` of the plans):
1. ``global``: NT-Xent on the encoder (pooled bottleneck + MLP g1) of two spatially and
   intensity-augmented views, with strategy ``GR`` (positives: the two views of a slice) or
   ``GD`` (also same-partition slices of other volumes; batches of volumes x partitions);
2. ``local``: the encoder frozen, the first ``decoder_blocks`` decoder stages and the head g2 learn
   the local loss ``LR`` or ``LD`` over 13 ``region_size`` x ``region_size`` regions of two
   intensity-only views (in 3D: ``LR`` over 35 cubes; ``GD`` and ``LD`` are 2D only, the preset's
   3d_fullres block sets ``GR``);
3. ``finetune``: nnU-Net's own supervised training on the labelled cases.
Both pretraining stages read images of all training cases (labelled and unlabelled, labels unused)
and the added unlabelled images.
Variant: ``nnUNetTrainerGlobalContrast`` (SimCLR-style G^R pretraining only, then fine-tuning).
"""
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn

from nnunet_contrast.data.pixel_selection import region_vectors
from nnunet_contrast.data.slices import (PartitionDataLoader, SliceInfoDataLoader, check_partitionable, partition_of,
                                         slice_counts)
from nnunet_contrast.distributed import rank_share, world_size
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.losses import NTXentLoss, RegionLocalLoss
from nnunet_contrast.network.heads import DenseProjectionHead
from nnunet_contrast.network.taps import (check_unet, decoder_block_features, decoder_block_parameters,
                                          decoder_channels, decoder_stage_count)
from nnunet_contrast.training.global_local import GlobalLocalPretraining
from nnunet_contrast.training.schedule import ENCODER, Data, Head, Part, Stage, Term, Views
from nnunet_contrast.training.seeding import stage_stream
from nnunet_contrast.training.self_training import SELF_TRAINING_VARIANT
from nnunet_contrast.training.step import StepInputs

DECODER_BLOCKS = Part("decoder_blocks")  # the first decoder_blocks stages of nnU-Net's decoder


class nnUNetTrainerGlobalLocalContrast(GlobalLocalPretraining):
    presets = ("base", "globallocal_chaitanya2020")
    method_key = "globallocal"
    head_names = ("global", "local")
    own_parts = (DECODER_BLOCKS,)

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict):
        """G^D and L^D group 2D slices by their position in the volume; a 3D patch has no such position (on
        Hippocampus it holds the whole volume), so in 3D only G^R and L^R (docs/methods.md, Configurations)."""
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        strategies = {"global_strategy": settings.method.global_strategy,
                      "local_strategy": settings.method.local_strategy}
        partitioned = [f"{name}={value}" for name, value in strategies.items() if value in ("GD", "LD")]
        if len(plans_manager.get_configuration(configuration).patch_size) == 3 and partitioned:
            raise UserInputError(f"{cls.__name__}: {' and '.join(partitioned)} group 2D slices by their position in "
                                 f"the volume, which '{configuration}' patches do not have: set "
                                 f"nnunet_contrast.globallocal.global_strategy=GR and local_strategy=LR in the plans")
        return settings

    def build_schedule(self):
        s, adam = self.method_settings, self.pretrain_optimizer()
        iterations = self.pretrain_iterations(s.pretrain_iterations_per_epoch)
        return [
            Stage("global", s.global_epochs, iterations, (ENCODER, Head("global")), adam, (Term("global_contrast"),),
                  Data.PARTITIONS if s.global_strategy == "GD" else Data.ALL_IMAGES, Views.SPATIAL),
            # the encoder stays frozen while the decoder blocks learn the local loss
            Stage("local", s.local_epochs, iterations, (DECODER_BLOCKS, Head("local")), adam,
                  (Term("local_contrast"),), Data.PARTITIONS if s.local_strategy == "LD" else Data.ALL_IMAGES, Views.INTENSITY),
            self.nnunet_finetune_stage(),
        ]

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        self.global_loss = NTXentLoss(self.method_settings.temperature)
        self.local_loss = RegionLocalLoss(self.method_settings.temperature)

    def build_heads(self) -> nn.ModuleDict:
        heads = nn.ModuleDict({"global": self.global_head()})
        if "local" in self.schedule.names:  # a run without a local stage ignores its settings
            s = self.method_settings
            heads["local"] = DenseProjectionHead(decoder_channels(self.network, self.local_blocks - 1),
                                                 s.local_head_hidden, s.local_head_dim, normalize=False,
                                                 dims=self.patch_dims)
        return heads

    @property
    def local_blocks(self) -> int:
        """The decoder stages the local stage trains: ``decoder_blocks``, but none of the last
        ``keep_output_blocks`` (a shallow decoder keeps stages that only the segmentation loss trains)."""
        s, available = self.method_settings, decoder_stage_count(self.network)
        if s.decoder_blocks > available:
            raise UserInputError(f"nnunet_contrast.globallocal.decoder_blocks is {s.decoder_blocks} but this network "
                                 f"has {available} decoder stages: set it to at most {available} in the plans")
        blocks = min(s.decoder_blocks, available - s.keep_output_blocks)
        if blocks < 1:
            raise UserInputError(f"nnunet_contrast.globallocal.keep_output_blocks is {s.keep_output_blocks} but this "
                                 f"network has {available} decoder stages: set it to at most {available - 1}")
        return blocks

    def parameters_of(self, part: Part):
        if part == DECODER_BLOCKS:
            return decoder_block_parameters(self.network, self.local_blocks)
        return super().parameters_of(part)

    # ------------------------------------------------------------ data
    def build_stage_loader(self, data: Data):
        """Images of all training cases and the added unlabelled images, labels dropped: random
        slices (G^R, L^R) or partition batches (G^D, L^D)."""
        dataset = self.all_images_dataset()
        batch_size, partitions = self.method_settings.pretrain_batch_size, self.method_settings.partitions
        where = "nnunet_contrast.globallocal in the plans"
        if data == Data.ALL_IMAGES:  # under DDP each rank its part of the batch, split as nnU-Net splits its own
            if batch_size < world_size():
                raise UserInputError(f"pretrain_batch_size ({batch_size}) is split over {world_size()} GPUs: set it "
                                     f"to at least {world_size()} ({where})")
            volumes = self.patch_dims == 3  # G^R in 3D: nnU-Net's 3D patches
            return self.build_image_loader(dataset, rank_share(batch_size), stage_stream(data),
                                           nnUNetDataLoader if volumes else SliceInfoDataLoader)
        if batch_size < 2 * partitions:  # a single volume per batch would leave G^D / L^D without negatives
            raise UserInputError(f"partition batches need at least 2 volumes: set pretrain_batch_size "
                                 f"({batch_size}) to at least {2 * partitions}, 2 x partitions ({where})")
        try:
            check_partitionable(slice_counts(dataset), partitions)
            # under DDP the volumes of a batch are split over the ranks, each keeping its partitions whole
            # (a batch that is no multiple of partitions goes to the loader as it is, which says so)
            if batch_size % partitions == 0:
                batch_size = rank_share(batch_size // partitions) * partitions
            return self.build_image_loader(dataset, batch_size, stage_stream(data), PartitionDataLoader,
                                           partitions=partitions)
        except ValueError as error:  # too few slices per volume, too few volumes, not a multiple of partitions
            raise UserInputError(f"{error} ({where})") from None

    def partition_groups(self, inputs: StepInputs):
        """The slice partition of each image of a partition batch (the positives of G^D / L^D), else None."""
        if inputs.stage.data != Data.PARTITIONS:
            return None
        batch = inputs.batch
        parts = partition_of(batch["slice_index"], batch["slice_count"], self.method_settings.partitions)
        return torch.as_tensor(parts, device=self.device)

    # ------------------------------------------------------------ losses (images of the stage's loader, no labels)
    def global_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        return self.global_loss(*self.global_view_embeddings(inputs.views(inputs.images)), self.partition_groups(inputs))

    def local_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        s = self.method_settings
        features = decoder_block_features(self.network, torch.cat(inputs.views(inputs.images)), self.local_blocks,
                                          train_encoder=False)
        regions = region_vectors(self.heads["local"](features), s.region_size)
        return self.local_loss(*regions.chunk(2), self.partition_groups(inputs))


class nnUNetTrainerGlobalContrast(nnUNetTrainerGlobalLocalContrast):
    """Global-only baseline ("Global" of Hu et al. Table 1): SimCLR (G^R) pretraining of the
    encoder, then nnU-Net fine-tuning; no local stage. In 3D the views are of nnU-Net's 3D patches."""
    variant_settings = {"globallocal": {"global_strategy": "GR", "local_epochs": 0}}


class nnUNetTrainerGlobalLocalContrastSelfTraining(nnUNetTrainerGlobalLocalContrast):
    """GlobalLocal's pretraining, then the self-training stage instead of nnU-Net's fine-tuning."""
    variant_settings = SELF_TRAINING_VARIANT


class nnUNetTrainerGlobalContrastSelfTraining(nnUNetTrainerGlobalContrast):
    """The global pretraining, then the self-training stage instead of nnU-Net's fine-tuning."""
    variant_settings = {**nnUNetTrainerGlobalContrast.variant_settings, **SELF_TRAINING_VARIANT}
