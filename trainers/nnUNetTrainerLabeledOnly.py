"""nnUNetTrainerLabeledOnly: plain nnU-Net trained on the labelled cases of the semi-supervised
split only, with the budget of the plans' ``nnunet_contrast.budget``. The baseline ("random
init" in the papers) every method is compared with.

``nnUNetTrainerLabeledOnlyTwiceIterations``: the same with twice the iterations per epoch, a baseline
matched to the compute of a method that processes a labelled and an unlabelled batch per step."""
import dataclasses

from nnunet_contrast.training.semisup import SemiSupervisedTrainer


class nnUNetTrainerLabeledOnly(SemiSupervisedTrainer):
    uses_unlabeled = False


class nnUNetTrainerLabeledOnlyTwiceIterations(nnUNetTrainerLabeledOnly):
    """Twice ``budget.num_iterations_per_epoch``; the epochs (and so the poly schedule's length) as the budget.
    The saved settings say what it ran (the doubled budget)."""

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict):
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        doubled = dataclasses.replace(settings.budget, num_iterations_per_epoch=2 * settings.budget.num_iterations_per_epoch)
        return dataclasses.replace(settings, budget=doubled)
