"""nnUNetTrainerCrossLevel: Zhao et al., "Cross-level contrastive learning and consistency constraint
for semi-supervised medical image segmentation", ISBI 2022 (../shared/docs/methods.md, section 2).

One nnU-Net run (nnU-Net's SGD and poly schedule throughout; the head joins the SGD), settings in
``nnunet_contrast.crosslevel`` of the plans. Every step: nnU-Net's segmentation loss on the labelled
batch; the labelled and unlabelled images are also cut into ``grid x grid`` sub-patches that go
through the same network on their own (``nnunet_contrast.subpatches``), and
1. ``contrast`` (the first ``contrast_fraction`` of the epochs): ``alpha`` x the cross-level
   contrast (Eq. 1): cell i of the full patch's projection p(Z) against p(z_i) of sub-patch i
   (detached), the other cells of p(Z) as negatives;
2. ``consistency`` (the rest): ``beta`` x the patch-image consistency (Eq. 2): MSE of the sub-patch
   probabilities against cell i of the full patch's probabilities (detached).
"""
import torch
from torch import nn

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.heads import CellProjectionHead
from nnunet_contrast.losses import DenseInfoNCELoss, PatchImageConsistencyLoss
from nnunet_contrast.subpatches import SubPatchGrid
from nnunet_contrast.taps import check_unet, decoder_channels, forward_with_decoder_features, total_stride
from nnunet_contrast.training.contrast import ContrastTrainer, batch_part, full_resolution

CONTRAST, CONSISTENCY = "contrast", "consistency"


class nnUNetTrainerCrossLevel(ContrastTrainer):
    presets = ("base", "crosslevel_zhao2022")
    method_key = "crosslevel"
    requires_unlabeled = True
    heads_in_network_optimizer = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        fraction = self.method_settings["contrast_fraction"]
        self.contrast_epochs = int(fraction * self.num_epochs + 0.5)  # rounded half up
        self._grid = None

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict) -> dict:
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        patch_size = plans_manager.get_configuration(configuration).patch_size
        try:
            SubPatchGrid(patch_size, settings[cls.method_key]["grid"], (1, 1))
        except ValueError as error:
            raise UserInputError(f"{cls.__name__}: {error}: set nnunet_contrast.crosslevel.grid in the plans to one "
                                 f"of them, or 0 to choose automatically") from None
        return settings

    def stage_names(self):
        return [CONTRAST, CONSISTENCY]

    def stage_at(self, epoch: int) -> str:
        return CONTRAST if epoch < self.contrast_epochs else CONSISTENCY

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        s = self.method_settings
        self.print_to_log_file(f"Cross-level grid: {self.grid.describe()}")
        self.contrast = DenseInfoNCELoss(s["temperature"])
        self.consistency = PatchImageConsistencyLoss()

    @property
    def grid(self) -> SubPatchGrid:
        """The sub-patch grid of the planned patch and the network's total stride (once the network exists)."""
        if self._grid is None:
            self._grid = SubPatchGrid(self.configuration_manager.patch_size, self.method_settings["grid"],
                                      total_stride(self.network))
        return self._grid

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({"cell": CellProjectionHead(decoder_channels(self.network), self.grid.cell,
                                                         s["head_hidden"], s["embedding_dim"])})

    # ------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        unlabeled = self.next_unlabeled_images()

        def step_loss():
            seg_loss, unsupervised = self.step_losses(batch, unlabeled)
            return seg_loss + unsupervised, {"unsupervised": unsupervised}
        return self.optimizer_step(step_loss)

    def step_losses(self, batch: dict, unlabeled):
        """(nnU-Net's loss on the labelled batch, the stage's weighted cross-level term on the labelled
        and unlabelled images). One forward pass over both batches (nnU-Net's networks normalise per
        instance, so the labelled outputs are those of the labelled batch alone)."""
        data, target = self.labeled_batch_on_device(batch)
        images = data if unlabeled is None else torch.cat([data, unlabeled.to(self.device, non_blocking=True)])
        s = self.method_settings
        if self.stage_at(self.current_epoch) == CONTRAST:
            output, features = forward_with_decoder_features(self.network, images)
            unsupervised = s["alpha"] * self.contrast_term(images, features)
        else:
            output = self.network(images)
            unsupervised = s["beta"] * self.consistency_term(images, full_resolution(output))
        return self.loss(batch_part(output, slice(0, data.shape[0])), target), unsupervised

    def contrast_term(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Eq. 1: features (B, C, H, W) of the full patches' last decoder stage."""
        head = self.heads["cell"]
        queries = head(features).flatten(2).transpose(1, 2)                       # (B, n*n, D), row-major cells
        with torch.no_grad():  # the sub-patch key is detached (reference code), so no graph is needed
            _, sub_features = forward_with_decoder_features(self.network, self.grid.sub_patches(images))
            keys = head(self.grid.crop(sub_features).flatten(0, 1))               # (B*n*n, D, 1, 1)
        keys = keys.reshape(queries.shape)
        return self.contrast(queries, keys, negatives=queries)

    def consistency_term(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Eq. 2: logits (B, K, H, W) of the full patches."""
        sub_logits = full_resolution(self.network(self.grid.sub_patches(images)))
        return self.consistency(self.grid.crop(sub_logits), self.grid.cut(logits))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.print_to_log_file(f"Stage: {self.stage_at(self.current_epoch)}")

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        values = [float(o["unsupervised"]) for o in train_outputs if "unsupervised" in o]
        self.log_contrast(sum(values) / len(values) if values else float("nan"), self.stage_at(self.current_epoch))
