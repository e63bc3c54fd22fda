"""nnUNetTrainerPseudoLabelContrast: Chaitanya et al., "Local contrastive loss with pseudo-label
based self-training for semi-supervised medical image segmentation", MedIA 2023
(docs/methods.md, its section).

One nnU-Net run (nnU-Net's SGD and poly schedule throughout), settings in
``nnunet_contrast.pseudolabel`` of the plans:
1. ``warmup`` (the first ``warmup_fraction`` of the epochs): nnU-Net's own training on labelled cases;
2. ``joint``: nnU-Net's segmentation loss on the labelled batch plus ``lambda_cont`` x the class-mean
   local contrast (Eq. 3-4) on labelled images (true labels) and unlabelled images (pseudo-labels).
   A frozen copy of the network, refreshed at the start of each of ``pseudo_label_rounds`` rounds,
   labels every augmented unlabelled batch. Pseudo-labels enter the contrastive loss only.
Variants: ``nnUNetTrainerPseudoLabelContrastInter`` (inter-image matching), and of each the ``...SelfTraining``
variant (the teacher's pseudo-labels added to the joint training).
"""
import torch
from torch import nn

from nnunet_contrast.data.pixel_selection import sample_class_pixels
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.losses import ClassMeanContrastLoss
from nnunet_contrast.network.heads import DenseProjectionHead
from nnunet_contrast.network.taps import check_unet, decoder_channels
from nnunet_contrast.training.method import MethodTrainer
from nnunet_contrast.training.pseudo_labels import PseudoLabeler, round_start_epochs
from nnunet_contrast.training.schedule import (HEADS, NETWORK, SEGMENTATION, Data, Labeller, NnUNetSGD, Stage,
                                               Term, epochs_of)
from nnunet_contrast.training.self_training import SELF_TRAINING_VARIANT
from nnunet_contrast.training.step import StepInputs

WARMUP, JOINT = "warmup", "joint"


def warmup_and_rounds(settings):
    """(warm-up epochs, (first epoch, epochs) of each pseudo-labelling round) from the settings."""
    epochs, s = settings.budget.num_epochs, settings.method
    warmup = epochs_of(s.warmup_fraction, epochs)
    starts = round_start_epochs(warmup, epochs, s.pseudo_label_rounds)
    return warmup, [(start, end - start) for start, end in zip(starts, starts[1:] + [epochs])]


class nnUNetTrainerPseudoLabelContrast(MethodTrainer):
    presets = ("base", "pseudolabel_chaitanya2023")
    method_key = "pseudolabel"
    head_names = ("local",)
    requires_unlabeled = True

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict):
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        warmup, rounds = warmup_and_rounds(settings)
        if not rounds:
            raise UserInputError(f"{cls.__name__}: the warm-up takes all {warmup} epochs, leaving none for the "
                                 f"contrastive joint training: lower nnunet_contrast.pseudolabel.warmup_fraction or "
                                 f"raise nnunet_contrast.budget.num_epochs in the plans")
        return settings

    def build_schedule(self):
        """The warm-up, then one ``joint`` stage per pseudo-labelling round; one SGD and poly schedule
        over all of them (the head joins it)."""
        warmup, rounds = warmup_and_rounds(self.settings)
        iterations, trains = self.settings.budget.num_iterations_per_epoch, (NETWORK, HEADS)
        joint = (Term(SEGMENTATION), Term("contrast", self.method_settings.lambda_cont, features=True))
        labeller = Labeller.SNAPSHOT if self.method_settings.labeller == "snapshot" else Labeller.EMA_TEACHER
        return [Stage(WARMUP, warmup, iterations, trains, NnUNetSGD(), (Term(SEGMENTATION),), Data.LABELED)] + \
            [Stage(JOINT, epochs, iterations, trains, NnUNetSGD(), joint, Data.LABELED_AND_UNLABELED, labeller=labeller)
             for _, epochs in rounds]

    def initialize(self):
        super().initialize()
        check_unet(self.network)
        s = self.method_settings
        self.contrast = ClassMeanContrastLoss(s.temperature, s.matching, s.background_negative)

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({"local": DenseProjectionHead(decoder_channels(self.network), s.head_hidden,
                                                           s.embedding_dim, normalize=False, dims=self.patch_dims)})

    def new_snapshot(self) -> PseudoLabeler:
        return PseudoLabeler(self.network, self.method_settings.min_flip_agreement)

    # ------------------------------------------------------------ the contrastive term
    def contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Eq. 3-4 on the joint pass's last decoder stage: true labels of the labelled images, the stage's
        labeller's of the unlabelled ones (the frozen snapshot's, as in the paper, or the EMA teacher's
        confident ones with ``labeller = teacher``; in a self-training stage, each pixel's target)."""
        return self.contrast_term(inputs.joint.features, inputs.labels)

    def contrast_term(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 3-4 over the batch; labels: true labels of labelled, pseudo-labels of unlabelled images."""
        s = self.method_settings
        anchors = sample_class_pixels(labels, self.label_manager.foreground_labels, s.pixels_per_class)
        partners = None
        if s.matching == "inter":  # Eq. 2 pairs random images: a random shift pairs each with another
            shift = int(torch.randint(1, max(2, len(labels)), ()))
            partners = (torch.arange(len(labels), device=labels.device) + shift) % len(labels)
        embeddings = self.heads["local"](features)
        return self.contrast(embeddings, labels, anchors, self.label_manager.num_segmentation_heads, partners)


class nnUNetTrainerPseudoLabelContrastInter(nnUNetTrainerPseudoLabelContrast):
    """Inter-image matching: class means of the image and of a partner image of the batch."""
    variant_settings = {"pseudolabel": {"matching": "inter"}}


class nnUNetTrainerPseudoLabelContrastSelfTraining(nnUNetTrainerPseudoLabelContrast):
    """The method's joint training with the self-training term added (EMA teacher's pseudo-labels)."""
    variant_settings = SELF_TRAINING_VARIANT


class nnUNetTrainerPseudoLabelContrastInterSelfTraining(nnUNetTrainerPseudoLabelContrastInter):
    """Inter-image matching with the self-training term added."""
    variant_settings = {**nnUNetTrainerPseudoLabelContrastInter.variant_settings, **SELF_TRAINING_VARIANT}
