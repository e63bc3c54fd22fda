"""nnUNetTrainerCrossLevel: Zhao et al., "Cross-level contrastive learning and consistency constraint
for semi-supervised medical image segmentation", ISBI 2022 (docs/methods.md, its section).

One nnU-Net run (nnU-Net's SGD and poly schedule throughout; the head joins the SGD), settings in
``nnunet_contrast.crosslevel`` of the plans. Every step: nnU-Net's segmentation loss on the labelled
batch; the labelled and unlabelled images are also cut into ``grid x grid`` sub-patches that go
through the same network on their own (``nnunet_contrast.network.subpatches``), and
1. ``contrast`` (the first ``contrast_fraction`` of the epochs): ``alpha`` x the cross-level
   contrast (Eq. 1): cell i of the full patch's projection p(Z) against p(z_i) of sub-patch i
   (detached), the other cells of p(Z) as negatives;
2. ``consistency`` (the rest): ``beta`` x the patch-image consistency (Eq. 2): MSE of the sub-patch
   probabilities against cell i of the full patch's probabilities (detached).
"""
import torch
from torch import nn

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.losses import DenseInfoNCELoss, PatchImageConsistencyLoss
from nnunet_contrast.network.heads import CellProjectionHead
from nnunet_contrast.network.subpatches import SubPatchGrid
from nnunet_contrast.network.taps import check_unet, decoder_channels, forward_with_decoder_features, total_stride
from nnunet_contrast.training.method import MethodTrainer
from nnunet_contrast.training.schedule import (HEADS, NETWORK, SEGMENTATION, Data, NnUNetSGD, Stage, Term,
                                               epochs_of)
from nnunet_contrast.training.self_training import SELF_TRAINING_VARIANT
from nnunet_contrast.training.step import StepInputs, full_resolution

CONTRAST, CONSISTENCY = "contrast", "consistency"


class nnUNetTrainerCrossLevel(MethodTrainer):
    presets = ("base", "crosslevel_zhao2022")
    method_key = "crosslevel"
    head_names = ("cell",)
    requires_unlabeled = True

    def build_schedule(self):
        """Both phases read labelled and unlabelled batches and share nnU-Net's SGD and poly schedule
        (the head joins it)."""
        s, epochs = self.method_settings, self.settings.budget.num_epochs
        contrast_epochs = epochs_of(s.contrast_fraction, epochs)
        iterations, trains = self.settings.budget.num_iterations_per_epoch, (NETWORK, HEADS)
        return [Stage(CONTRAST, contrast_epochs, iterations, trains, NnUNetSGD(),
                      (Term(SEGMENTATION), Term("cross_level_contrast", s.alpha, features=True)), Data.LABELED_AND_UNLABELED),
                Stage(CONSISTENCY, epochs - contrast_epochs, iterations, trains, NnUNetSGD(),
                      (Term(SEGMENTATION), Term("patch_consistency", s.beta)), Data.LABELED_AND_UNLABELED)]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._grid = None

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict):
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        patch_size = plans_manager.get_configuration(configuration).patch_size
        try:
            SubPatchGrid(patch_size, settings.method.grid, (1,) * len(patch_size))
        except ValueError as error:
            raise UserInputError(f"{cls.__name__}: {error}: set nnunet_contrast.crosslevel.grid in the plans to one "
                                 f"of them, or 0 to choose automatically") from None
        return settings

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        self.print_to_log_file(f"Cross-level grid: {self.grid.describe()}")
        self.contrast = DenseInfoNCELoss(self.method_settings.temperature)
        self.consistency = PatchImageConsistencyLoss()

    @property
    def grid(self) -> SubPatchGrid:
        """The sub-patch grid of the planned patch and the network's total stride (once the network exists)."""
        if self._grid is None:
            s = self.method_settings
            self._grid = SubPatchGrid(self.configuration_manager.patch_size, s.grid,
                                      total_stride(self.network, self.patch_dims),
                                      s.min_cell_strides)
        return self._grid

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({"cell": CellProjectionHead(decoder_channels(self.network), self.grid.cell,
                                                         s.head_hidden, s.embedding_dim)})

    # ------------------------------------------------------------ terms (on the labelled and unlabelled images)
    def cross_level_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 1: cell i of the full patches' projection (the joint pass's last decoder stage) against the
        projection of sub-patch i."""
        head = self.heads["cell"]
        queries = head(inputs.joint.features).flatten(2).transpose(1, 2)          # (B, n*n, D), row-major cells
        with torch.no_grad():  # the sub-patch key is detached (reference code), so no graph is needed
            _, sub_features = forward_with_decoder_features(self.network, self.grid.sub_patches(inputs.images))
            keys = head(self.grid.crop(sub_features).flatten(0, 1))               # (B*n*n, D, 1, 1)
        keys = keys.reshape(queries.shape)
        return self.contrast(queries, keys, negatives=queries)

    def patch_consistency_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 2: the sub-patches' probabilities against the full patches' cells (detached)."""
        logits = full_resolution(inputs.joint.outputs[0])
        sub_logits = full_resolution(self.network(self.grid.sub_patches(inputs.images)))
        return self.consistency(self.grid.crop(sub_logits), self.grid.cut(logits))


class nnUNetTrainerCrossLevelSelfTraining(nnUNetTrainerCrossLevel):
    """The method's joint training with the self-training term added (EMA teacher's pseudo-labels)."""
    variant_settings = SELF_TRAINING_VARIANT
