"""nnUNetTrainerSelfTraining and nnUNetTrainerCopyPaste: nnU-Net with the self-training stage alone
(``nnunet_contrast/training/self_training.py``, docs/methods.md, Self-training), settings in
``nnunet_contrast.selftraining`` of the plans.

1. ``warmup``: nnU-Net's own training on the labelled cases;
2. ``selftrain``: nnU-Net's loss on the labelled pixels plus, ramped up, on the EMA teacher's confident
   pseudo-labels of the unlabelled images, which the student sees intensity-perturbed and CutMixed
   (``nnUNetTrainerCopyPaste``: bidirectional copy-paste between labelled and unlabelled images, as BCP).
"""
from nnunet_contrast.training.method import MethodTrainer
from nnunet_contrast.training.self_training import self_training_stages


class nnUNetTrainerSelfTraining(MethodTrainer):
    requires_unlabeled = True

    def build_schedule(self):
        return self_training_stages(self.settings.budget, self.settings.selftraining)


class nnUNetTrainerCopyPaste(nnUNetTrainerSelfTraining):
    """The student sees bidirectional copy-paste of a box between labelled and unlabelled images."""
    variant_settings = {"selftraining": {"mixing": "copypaste"}}
