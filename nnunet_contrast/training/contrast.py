"""The common base of the method trainers: a settings section of their own, projection heads
saved with the checkpoint, the contrastive loss logged per epoch, and what they refuse."""
from typing import Callable, Dict, List, Tuple

import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist
from torch import nn

from nnunet_contrast.errors import UserInputError
from nnunet_contrast.training.progress import ContrastLocalLogger
from nnunet_contrast.training.semisup import SemiSupervisedTrainer


def batch_part(output, part: slice):
    """Images ``part`` of a network output (a tensor, or a list over deep-supervision resolutions)."""
    return [o[part] for o in output] if isinstance(output, (list, tuple)) else output[part]


def full_resolution(output):
    """nnU-Net's output (or target) at the patch's resolution: the first of the deep-supervision ones."""
    return output[0] if isinstance(output, (list, tuple)) else output


class ContrastTrainer(SemiSupervisedTrainer):
    """Subclasses set ``method_key`` (their settings section, e.g. ``"supconlocal"``) and define
    ``build_heads`` and ``stage_names``."""

    method_key = ""
    heads_in_network_optimizer = False  # True: the heads join nnU-Net's SGD (joint training, no stages)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.method_settings = self.settings[self.method_key]
        self._heads = None
        self.logger.local_logger = ContrastLocalLogger(self.stage_names())

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict) -> dict:
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        if dist.is_available() and dist.is_initialized():
            # contrastive steps call sub-modules and heads outside DDP: gradients would not sync
            raise UserInputError(f"{cls.__name__} trains on one GPU or the CPU only: run nnUNetv2_train "
                                 f"without -num_gpus")
        if plans_manager.get_label_manager(dataset_json).has_regions:
            raise UserInputError(f"{cls.__name__} needs class labels, not regions: train a dataset without "
                                 f"'regions_class_order' in its dataset.json")
        return settings

    # ------------------------------------------------------------ to define
    def stage_names(self) -> List[str]:
        raise NotImplementedError

    def build_heads(self) -> nn.ModuleDict:
        raise NotImplementedError

    def configure_optimizers(self):
        optimizer, schedule = super().configure_optimizers()
        if self.heads_in_network_optimizer:
            optimizer.add_param_group({"params": list(self.heads.parameters())})  # same SGD settings and schedule
        return optimizer, schedule

    # ------------------------------------------------------------ heads and logging
    @property
    def heads(self) -> nn.ModuleDict:
        if self._heads is None:
            self._heads = self.build_heads().to(self.device)
        return self._heads

    def on_train_epoch_start(self):
        self.heads.train()
        super().on_train_epoch_start()

    def log_contrast(self, loss: float, stage: str) -> None:
        """The epoch's contrastive loss (nan: none) and stage, for progress.png and the log."""
        self.logger.log("contrast_loss", loss, self.current_epoch)
        self.logger.log("stage", self.stage_names().index(stage), self.current_epoch)
        if loss == loss:
            self.print_to_log_file(f"contrastive loss ({stage}): {round(loss, 4)}")

    def labeled_batch_on_device(self, batch: dict):
        """(images, target) of nnU-Net's labelled batch on the device; target as nnU-Net gives it
        (a list over the deep-supervision resolutions, or one tensor)."""
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return batch["data"].to(self.device, non_blocking=True), target

    def optimizer_step(self, compute_loss: Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> dict:
        """One update of the current optimizer. ``compute_loss()`` runs under nnU-Net's autocast on
        CUDA and returns the loss and further values to log; returns nnU-Net's step output."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss, logged = compute_loss()
        self.backward_and_step(loss)
        return {"loss": loss.detach().cpu().numpy(), **{k: v.detach().cpu().numpy() for k, v in logged.items()}}

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's update (gradient scaling on CUDA, clipping at 12) over the optimizer's parameters."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    # ------------------------------------------------------------ checkpoints
    def checkpoint_extras(self) -> Dict:
        return {"heads": self.heads.state_dict(), "settings": self.settings}

    def restore_extras(self, extras: Dict, current_epoch: int) -> None:
        if extras.get("settings", self.settings) != self.settings:
            # nnU-Net allows continuing with, e.g., more epochs; stage boundaries move with the settings
            self.print_to_log_file("WARNING: the settings differ from those the checkpoint was trained with; "
                                   "stages follow the current settings (see nnunet_contrast_settings.json)")
        if "heads" in extras:
            self.heads.load_state_dict(extras["heads"])
