"""nnUNetTrainerPseudoLabelContrast: Chaitanya et al., "Local contrastive loss with pseudo-label
based self-training for semi-supervised medical image segmentation", MedIA 2023
(../shared/docs/methods.md, section 3).

One nnU-Net run (nnU-Net's SGD and poly schedule throughout), settings in
``nnunet_contrast.pseudolabel`` of the plans:
1. ``warmup`` (the first ``warmup_fraction`` of the epochs): nnU-Net's own training on labelled cases;
2. ``joint``: nnU-Net's segmentation loss on the labelled batch plus ``lambda_cont`` x the class-mean
   local contrast (Eq. 3-4) on labelled images (true labels) and unlabelled images (pseudo-labels).
   A frozen copy of the network, refreshed at the start of each of ``pseudo_label_rounds`` rounds,
   labels every augmented unlabelled batch. Pseudo-labels enter the contrastive loss only.
Variants: ``nnUNetTrainerPseudoLabelContrastInter`` (inter-image matching).
"""
import torch
from torch import nn

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.heads import DenseProjectionHead
from nnunet_contrast.losses import ClassMeanContrastLoss
from nnunet_contrast.pixel_selection import sample_class_pixels
from nnunet_contrast.pseudo_labels import PseudoLabeler, round_start_epochs
from nnunet_contrast.taps import check_unet, decoder_channels, forward_with_decoder_features
from nnunet_contrast.training.contrast import ContrastTrainer, batch_part, full_resolution

WARMUP, JOINT = "warmup", "joint"


class nnUNetTrainerPseudoLabelContrast(ContrastTrainer):
    presets = ("base", "pseudolabel_chaitanya2023")
    method_key = "pseudolabel"
    requires_unlabeled = True
    heads_in_network_optimizer = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.warmup_epochs, self.round_starts = self.schedule(self.settings)
        self.pseudo_labeler = None
        self.pseudo_label_round = -1

    @classmethod
    def schedule(cls, settings: dict):
        """(warm-up epochs, first epoch of each pseudo-labelling round) from the settings."""
        epochs, s = settings["budget"]["num_epochs"], settings[cls.method_key]
        warmup = int(s["warmup_fraction"] * epochs + 0.5)  # rounded half up
        return warmup, round_start_epochs(warmup, epochs, s["pseudo_label_rounds"])

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict) -> dict:
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        warmup, rounds = cls.schedule(settings)
        if not rounds:
            raise UserInputError(f"{cls.__name__}: the warm-up takes all {warmup} epochs, leaving none for the "
                                 f"contrastive joint training: lower nnunet_contrast.pseudolabel.warmup_fraction or "
                                 f"raise nnunet_contrast.budget.num_epochs in the plans")
        return settings

    def stage_names(self):
        return [WARMUP, JOINT]

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        s = self.method_settings
        self.contrast = ClassMeanContrastLoss(s["temperature"], s["matching"], s["background_negative"])

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({"local": DenseProjectionHead(decoder_channels(self.network), s["head_hidden"],
                                                           s["embedding_dim"], normalize=False)})

    # ------------------------------------------------------------ rounds
    def round_at(self, epoch: int) -> int:
        """Index of the pseudo-labelling round of ``epoch``; -1 during the warm-up."""
        return sum(start <= epoch for start in self.round_starts) - 1

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        current = self.round_at(self.current_epoch)
        if current >= 0 and current != self.pseudo_label_round:
            self.pseudo_labeler = PseudoLabeler(self.network, self.method_settings["confidence_threshold"])
            self.pseudo_label_round = current
            self.print_to_log_file(f"Pseudo-labelling round {current + 1}/{len(self.round_starts)}: labels from "
                                   f"the network as of epoch {self.current_epoch}")
        self.print_to_log_file(f"Stage: {WARMUP if current < 0 else JOINT}")

    # ------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        if self.round_at(self.current_epoch) < 0:
            return super().train_step(batch)  # warm-up: nnU-Net's own step
        unlabeled = self.next_unlabeled_images()

        def joint_loss():
            seg_loss, contrast = self.joint_losses(batch, unlabeled)
            return seg_loss + self.method_settings["lambda_cont"] * contrast, {"contrast": contrast}
        return self.optimizer_step(joint_loss)

    def joint_losses(self, batch: dict, unlabeled: torch.Tensor):
        """(nnU-Net's segmentation loss on the labelled batch, Eq. 3-4 on labelled and unlabelled images).

        One forward pass over both batches (nnU-Net's networks normalise per instance, so the
        labelled outputs are those of the labelled batch alone). Pseudo-labels of the unlabelled
        images come from the frozen snapshot and enter the contrastive term only.
        """
        data, target = self.labeled_batch_on_device(batch)
        unlabeled = unlabeled.to(self.device, non_blocking=True)
        pseudo = self.pseudo_labeler(unlabeled)
        output, features = forward_with_decoder_features(self.network, torch.cat([data, unlabeled]))
        seg_loss = self.loss(batch_part(output, slice(0, data.shape[0])), target)
        contrast = self.contrast_term(features, torch.cat([full_resolution(target)[:, 0].long(), pseudo]))
        return seg_loss, contrast

    def contrast_term(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 3-4 over the batch; labels: true labels of labelled, pseudo-labels of unlabelled images."""
        s = self.method_settings
        anchors = sample_class_pixels(labels, self.label_manager.foreground_labels, s["pixels_per_class"])
        partners = None
        if s["matching"] == "inter":  # Eq. 2 pairs random images: a random shift pairs each with another
            shift = int(torch.randint(1, max(2, len(labels)), ()))
            partners = (torch.arange(len(labels), device=labels.device) + shift) % len(labels)
        embeddings = self.heads["local"](features)
        return self.contrast(embeddings, labels, anchors, self.label_manager.num_segmentation_heads, partners)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        contrast = [float(o["contrast"]) for o in train_outputs if "contrast" in o]
        in_warmup = self.round_at(self.current_epoch) < 0
        self.log_contrast(sum(contrast) / len(contrast) if contrast else float("nan"), WARMUP if in_warmup else JOINT)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_extras(self):
        labeler = self.pseudo_labeler.state_dict() if self.pseudo_labeler is not None else None
        return {**super().checkpoint_extras(), "pseudo_labeler": labeler, "pseudo_label_round": self.pseudo_label_round}

    def restore_extras(self, extras, current_epoch: int) -> None:
        super().restore_extras(extras, current_epoch)
        if extras.get("pseudo_labeler") is not None:  # resume mid-round with that round's labels
            self.pseudo_labeler = PseudoLabeler(self.network, self.method_settings["confidence_threshold"])
            self.pseudo_labeler.load_state_dict(extras["pseudo_labeler"])
            self.pseudo_label_round = extras["pseudo_label_round"]


class nnUNetTrainerPseudoLabelContrastInter(nnUNetTrainerPseudoLabelContrast):
    """Inter-image matching: class means of the image and of a partner image of the batch."""
    variant_settings = {"pseudolabel": {"matching": "inter"}}
