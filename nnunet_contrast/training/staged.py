"""A trainer whose run is a sequence of stages: contrastive pretraining stages, then nnU-Net's
own supervised training ("finetune") with its loss, deep supervision, SGD and poly schedule.

Each pretraining stage has its own optimizer (Adam); the stage of the optimizer is saved in the
checkpoint so that ``nnUNetv2_train ... --c`` resumes mid-stage exactly where it stopped.
"""
import math
from typing import Dict, List, NamedTuple

import torch
from torch import nn

from nnunet_contrast.training.contrast import ContrastTrainer

FINETUNE = "finetune"


class Stage(NamedTuple):
    name: str
    epochs: int


class ConstantSchedule:
    """The learning rate of a pretraining stage stays as set (nnU-Net calls ``step(epoch)``)."""

    def step(self, *_):
        pass


class ShiftedSchedule:
    """nnU-Net's poly schedule over the fine-tuning epochs only."""

    def __init__(self, schedule, first_epoch: int):
        self.schedule, self.first_epoch = schedule, first_epoch

    def step(self, epoch=None):
        self.schedule.step(None if epoch is None else epoch - self.first_epoch)


class StagedContrastTrainer(ContrastTrainer):
    """Subclasses define ``pretraining_stages``, ``build_heads``, ``stage_parameters`` and
    ``contrast_loss``; fine-tuning is nnU-Net's own ``train_step``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_start = sum(s.epochs for s in self.stages[:-1])
        self.num_epochs = self.finetune_start + self.num_epochs
        self.finetune_iterations = self.num_iterations_per_epoch
        self.current_stage = None

    @property
    def stages(self) -> List[Stage]:
        return [s for s in self.pretraining_stages() if s.epochs > 0] + \
            [Stage(FINETUNE, self.settings["budget"]["num_epochs"])]

    def stage_names(self) -> List[str]:
        return [s.name for s in self.stages]

    # ------------------------------------------------------------ to define
    def pretraining_stages(self) -> List[Stage]:
        raise NotImplementedError

    def stage_parameters(self, stage: str) -> List[nn.Parameter]:
        raise NotImplementedError

    def contrast_loss(self, stage: str, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ stages
    def stage_at(self, epoch: int) -> str:
        end = 0
        for stage in self.stages:
            end += stage.epochs
            if epoch < end:
                return stage.name
        return FINETUNE

    def stage_start(self, name: str) -> int:
        """The first epoch of stage ``name``."""
        names = self.stage_names()
        return sum(s.epochs for s in self.stages[:names.index(name)])

    def stage_optimizer(self, stage: str):
        if stage == FINETUNE:
            total, self.num_epochs = self.num_epochs, self.stages[-1].epochs
            try:
                optimizer, schedule = super().configure_optimizers()
            finally:
                self.num_epochs = total
            return optimizer, ShiftedSchedule(schedule, self.finetune_start)
        optimizer = torch.optim.Adam(self.stage_parameters(stage), lr=self.method_settings["pretrain_lr"],
                                     weight_decay=self.method_settings["pretrain_weight_decay"])
        return optimizer, ConstantSchedule()

    def configure_optimizers(self):
        return self.stage_optimizer(self.stage_at(self.current_epoch))

    def enter_stage(self, stage: str) -> None:
        self.optimizer, self.lr_scheduler = self.stage_optimizer(stage)
        self.current_stage = stage
        # checkpoint_best is chosen on pseudo Dice, which means nothing before fine-tuning
        self._best_ema = None if stage == FINETUNE else math.inf
        self.print_to_log_file(f"Entering stage '{stage}' at epoch {self.current_epoch}")

    # ------------------------------------------------------------ nnU-Net hooks
    def iterations_per_epoch(self, stage: str) -> int:
        """nnU-Net's budget, or ``pretrain_iterations_per_epoch`` of the method for pretraining stages."""
        pretrain = self.method_settings.get("pretrain_iterations_per_epoch", 0)
        return pretrain if stage != FINETUNE and pretrain else self.finetune_iterations

    def on_train_epoch_start(self):
        stage = self.stage_at(self.current_epoch)
        if stage != self.current_stage:
            self.enter_stage(stage)
        # nnU-Net's loop reads this attribute at the start of every epoch
        self.num_iterations_per_epoch = self.iterations_per_epoch(stage)
        super().on_train_epoch_start()
        self.print_to_log_file(f"Stage: {stage}")

    def train_step(self, batch: dict) -> dict:
        if self.current_stage == FINETUNE:
            return super().train_step(batch)
        return self.optimizer_step(lambda: (self.contrast_loss(self.current_stage, batch), {}))

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        # in a pretraining stage nnU-Net's logged training loss is the contrastive loss
        contrast = float(self.logger.get_value("train_losses", step=-1)) \
            if self.current_stage != FINETUNE else float("nan")
        self.log_contrast(contrast, self.current_stage)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_extras(self) -> Dict:
        return {**super().checkpoint_extras(), "optimizer_stage": self.current_stage}

    def restore_extras(self, extras: Dict, current_epoch: int) -> None:
        super().restore_extras(extras, current_epoch)
        stage = extras.get("optimizer_stage") or self.stage_at(current_epoch)
        self.optimizer, self.lr_scheduler = self.stage_optimizer(stage)
        self.current_stage = stage
