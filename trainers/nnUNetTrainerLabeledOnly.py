"""nnUNetTrainerLabeledOnly: plain nnU-Net trained on the labelled cases of the semi-supervised
split only, with the budget of the plans' ``nnunet_contrast.budget``. The baseline ("random
init" in the papers) every method is compared with."""
from nnunet_contrast.training.semisup import SemiSupervisedTrainer


class nnUNetTrainerLabeledOnly(SemiSupervisedTrainer):
    uses_unlabeled = False
