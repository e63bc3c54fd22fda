"""The base of every method trainer: a run is the method's ``Schedule`` of stages, and this class
turns it into nnU-Net's loop.

A method defines ``build_schedule`` (its stages), ``build_heads`` (its projection heads) and a
``<term>_loss(inputs)`` method per loss term its stages name. Everything that depends on stages
happens here, once: the stage of each epoch, its optimizer and learning-rate schedule, its
iterations and data loader, the log lines, progress.png's shading, checkpoint_best (chosen in
supervised stages only) and ``--c`` (mid-stage, with the stage's optimizer state).
"""
import math
from os.path import join
from functools import cached_property
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunet_contrast.data.batch import Batch
from nnunet_contrast.data.mixing import labeled_copy_paste, student_batch
from nnunet_contrast.distributed import average_gradients, broadcast_module, gather_objects
from nnunet_contrast.errors import UserInputError
from nnunet_contrast.losses.masked_segmentation import EXCLUDED, MaskedSegmentationLoss
from nnunet_contrast.network.taps import forward_with_decoder_features, unwrap_network
from nnunet_contrast.training.progress import KEPT_CURVE, STAGE_CURVE, SUPERVISED_CURVE, ContrastLocalLogger, term_key
from nnunet_contrast.training.pseudo_labels import PseudoLabeler
from nnunet_contrast.training.schedule import (ENCODER, HEADS, NETWORK, SEGMENTATION, Adam, Data, Head,
                                               Labeller, NnUNetSGD, Part, Schedule, Stage, Term, replace_finetuning)
from nnunet_contrast.training.self_training import COVERAGE, self_training_schedule, teacher_curve_keys
from nnunet_contrast.training.semisup import SemiSupervisedTrainer
from nnunet_contrast.training.teaching import EmaTeaching
from nnunet_contrast.training.step import JointPass, StepInputs, batch_part, full_resolution

FINETUNE = "finetune"
PRETRAINED_CHECKPOINT = "checkpoint_pretrained.pth"


class ConstantSchedule:
    """The learning rate stays as set (nnU-Net calls ``step(epoch)`` every epoch)."""

    def step(self, *_):
        pass


class ShiftedSchedule:
    """nnU-Net's poly schedule over the epochs of the stages that share the optimizer."""

    def __init__(self, schedule, first_epoch: int):
        self.schedule, self.first_epoch = schedule, first_epoch

    def step(self, epoch=None):
        self.schedule.step(None if epoch is None else epoch - self.first_epoch)


class MethodTrainer(EmaTeaching, SemiSupervisedTrainer):
    """Subclasses set ``method_key`` (their settings section, e.g. ``"supconlocal"``), ``head_names`` (the
    heads ``build_heads`` builds) and ``own_parts`` (parts they resolve in ``parameters_of``), and define
    ``build_schedule``, ``build_heads`` and the ``<term>_loss`` methods."""

    method_key = ""
    head_names: Tuple[str, ...] = ()
    own_parts: Tuple[Part, ...] = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.schedule.total_epochs  # nnU-Net's loop reads this once, at its start
        self.stage_index: Optional[int] = None
        self.steps_this_epoch = 0
        self._heads = None
        self.stage_loaders: Dict[Data, object] = {}
        self.pseudo_labeler: Optional[PseudoLabeler] = None  # the snapshot of the current round, if any
        unsupervised = [term.name for stage in self.schedule.stages for term in stage.terms if term.name != SEGMENTATION]
        self.logger.local_logger = ContrastLocalLogger(self.schedule.names, list(dict.fromkeys(unsupervised)),
                                                       [*teacher_curve_keys(self.label_manager.all_labels), KEPT_CURVE])

    @classmethod
    def check_supported(cls, plans_manager, configuration: str, dataset_json: dict):
        settings = super().check_supported(plans_manager, configuration, dataset_json)
        if plans_manager.get_label_manager(dataset_json).has_regions:
            raise UserInputError(f"{cls.__name__} needs class labels, not regions: train a dataset without "
                                 f"'regions_class_order' in its dataset.json")
        return settings

    def plan_run(self) -> None:
        """The method's settings and its schedule (``build_schedule`` reads settings only)."""
        self.method_settings = self.settings.method
        try:
            self.schedule = Schedule(self.with_finetune_setting(self.build_schedule()))
        except ValueError as error:
            raise UserInputError(f"{type(self).__name__}: {error}") from None
        self.check_schedule()

    def check_schedule(self) -> None:
        """Every term has its loss and every trained part resolves, checked when the trainer is built:
        a misnamed term or part fails in one line before nnU-Net writes anything, not when its stage starts."""
        known = {NETWORK, ENCODER, HEADS, *self.own_parts, *(Head(name) for name in self.head_names)}
        for stage in self.schedule.stages:
            unknown = [str(part) for part in stage.trains if part not in known]
            no_loss = [f"{term.name}_loss" for term in stage.terms if not callable(getattr(self, f"{term.name}_loss", None))]
            if unknown or no_loss:
                raise UserInputError(f"{type(self).__name__}, stage '{stage.name}': "
                                     + "; ".join(filter(None, [unknown and f"no trainable part {', '.join(unknown)}",
                                                               no_loss and f"no loss method {', '.join(no_loss)}"])))

    # ------------------------------------------------------------ to define
    def build_schedule(self) -> List[Stage]:
        raise NotImplementedError

    def build_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict()

    # ------------------------------------------------------------ stages
    def nnunet_finetune_stage(self) -> Stage:
        """nnU-Net's own supervised training on the labelled cases, ``budget.num_epochs`` long."""
        budget = self.settings.budget
        return Stage(FINETUNE, budget.num_epochs, budget.num_iterations_per_epoch, (NETWORK,), NnUNetSGD(),
                     (Term(SEGMENTATION),), Data.LABELED)

    def with_finetune_setting(self, stages: List[Stage]) -> List[Stage]:
        """``run.finetune``: the method's own fine-tuning stages, nnU-Net's own fine-tuning instead, or
        self-training (``training/self_training.py``)."""
        kind = self.settings.run.finetune
        if kind == "selftraining":
            return self_training_schedule(stages, self.settings.budget, self.settings.selftraining)
        if kind == "nnunet":
            return replace_finetuning(stages, [self.nnunet_finetune_stage()])
        return stages

    def pretrain_iterations(self, setting: int) -> int:
        """A pretraining stage's iterations per epoch: ``setting``, or nnU-Net's budget when it is 0."""
        return setting or self.settings.budget.num_iterations_per_epoch

    @property
    def current_stage(self) -> Optional[Stage]:
        return None if self.stage_index is None else self.schedule.stages[self.stage_index]

    def term_progress(self, term: Term) -> float:
        """Where this step stands in the stages with ``term``, in [0, 1): for weights that change."""
        done = (self.current_epoch - self.schedule.starts[self.stage_index]) * self.current_stage.iterations
        return self.schedule.term_progress(term.name, self.stage_index, done + self.steps_this_epoch)

    # ------------------------------------------------------------ what trains, and how
    @property
    def heads(self) -> nn.ModuleDict:
        if self._heads is None:  # under DDP, rank 0's initial weights on every rank (as DDP does for the network)
            heads = self.build_heads()
            if not set(heads) <= set(self.head_names):
                raise TypeError(f"{type(self).__name__}.build_heads built {sorted(heads)}; its head_names say "
                                f"{list(self.head_names)}")
            self._heads = broadcast_module(heads.to(self.device))
        return self._heads

    def parameters_of(self, part: Part) -> List[nn.Parameter]:
        """The parameters of a part a stage trains; subclasses resolve their ``own_parts``."""
        if part == NETWORK:
            return list(self.network.parameters())
        if part == ENCODER:
            return list(unwrap_network(self.network).encoder.parameters())
        if part == HEADS:
            return list(self.heads.parameters())
        if isinstance(part, Head):
            return list(self.heads[part.name].parameters())
        raise ValueError(f"{type(self).__name__} has no trainable part '{part}'")

    def stage_parameters(self, stage: Stage) -> List[nn.Parameter]:
        return [p for part in stage.trains for p in self.parameters_of(part)]

    def stage_optimizer(self, index: int):
        """(optimizer, learning-rate schedule) of stage ``index``, for the epochs of its optimizer span."""
        stage = self.schedule.stages[index]
        first_epoch, epochs = self.schedule.span(index)
        if isinstance(stage.optimizer, Adam):
            optimizer = torch.optim.Adam(self.stage_parameters(stage), lr=stage.optimizer.lr, weight_decay=stage.optimizer.weight_decay)
            return optimizer, ConstantSchedule()
        if NETWORK not in stage.trains:
            raise ValueError(f"stage '{stage.name}': nnU-Net's SGD trains the network")
        optimizer, _ = super().configure_optimizers()  # nnU-Net's SGD over the network, its settings
        for part in stage.trains:
            if part != NETWORK:  # same SGD settings and schedule
                optimizer.add_param_group({"params": self.parameters_of(part)})
        return optimizer, ShiftedSchedule(PolyLRScheduler(optimizer, self.initial_lr, epochs), first_epoch)

    def configure_optimizers(self):
        return self.stage_optimizer(self.schedule.index_at(self.current_epoch))

    def enter_stage(self, index: int) -> None:
        """Called at the first epoch of each stage (not when ``--c`` resumes inside it)."""
        if index == self.schedule.pretraining_end:
            self.save_pretrained()
        previous, self.stage_index = self.stage_index, index
        stage = self.current_stage
        if previous is None or not self.schedule.shares_optimizer(previous, index):
            self.optimizer, self.lr_scheduler = self.stage_optimizer(index)
        # checkpoint_best is chosen on pseudo Dice, which means nothing while the segmentation loss is not trained
        if not stage.supervised:
            self._best_ema = math.inf
        elif self._best_ema == math.inf:
            self._best_ema = None
        self.finish_unused_loaders()
        self.print_to_log_file(f"Entering stage '{stage.name}' at epoch {self.current_epoch}")
        if stage.reads_teacher:
            self.start_teacher()
        if stage.labeller == Labeller.SNAPSHOT:  # a round starts: labels from a fresh frozen copy of the network
            self.pseudo_labeler = self.new_snapshot()
            rounds = [i for i, s in enumerate(self.schedule.stages) if s.labeller == Labeller.SNAPSHOT]
            self.print_to_log_file(f"Pseudo-labelling round {rounds.index(index) + 1}/{len(rounds)}: labels from "
                                   f"the network as of epoch {self.current_epoch}")

    def save_pretrained(self) -> None:
        """The run as its pretraining leaves it, before any fine-tuning step: the weights nnU-Net's
        ``-pretrained_weights`` starts another trainer from (e.g. Chaitanya et al. 2023's "pretrained
        initialisation + proposed method", Table III; not IDEAL, whose network has a second decoder)."""
        path = join(self.output_folder, PRETRAINED_CHECKPOINT)
        self.save_checkpoint(path)
        if not self.disable_checkpointing:
            self.print_to_log_file(f"Pretraining done: its weights are in {path} (any trainer starts from them "
                                   f"with nnUNetv2_train ... -pretrained_weights {path})")

    def new_snapshot(self) -> PseudoLabeler:
        """The pseudo-labeller of a ``Labeller.SNAPSHOT`` round: a frozen copy of the network."""
        return PseudoLabeler(self.network)

    def labeller(self, stage: Stage) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The pseudo-labeller ``stage`` reads: images -> labels, ``EXCLUDED`` where it does not trust them."""
        if stage.labeller == Labeller.EMA_TEACHER:
            return lambda images: self.teacher(images, self.reliable_share())
        return {Labeller.NONE: None, Labeller.SNAPSHOT: self.pseudo_labeler}[stage.labeller]

    # ------------------------------------------------------------ data of a stage
    def reads_unlabeled_batches(self) -> bool:
        return any(s.reads_unlabeled for s in self.schedule.stages)

    def stage_loader(self, stage: Stage):
        """nnU-Net's labelled loader, or the stage's own loader (built once, on first use)."""
        if stage.data in (Data.LABELED, Data.LABELED_MIXED, Data.LABELED_AND_UNLABELED, Data.STUDENT):
            return self.dataloader_labeled
        if stage.data not in self.stage_loaders:
            self.stage_loaders[stage.data] = self.build_stage_loader(stage.data)
        return self.stage_loaders[stage.data]

    def build_stage_loader(self, data: Data):
        raise ValueError(f"{type(self).__name__} has no loader for '{data}'")

    def finish_unused_loaders(self) -> None:
        """Stop the worker processes of stage loaders that this and later stages no longer read."""
        later = {s.data for s in self.schedule.stages[self.stage_index:]}
        for data in [d for d in self.stage_loaders if d not in later]:
            self.stage_loaders.pop(data).finish()

    def extra_loaders(self):
        return list(self.stage_loaders.values())

    def get_dataloaders(self):
        loaders = super().get_dataloaders()
        self.dataloader_labeled = loaders[0]
        return loaders

    # ------------------------------------------------------------ nnU-Net hooks
    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"Stages of {type(self).__name__}: {self.schedule.describe()}", add_timestamp=False)
        if any(s.data == Data.STUDENT for s in self.schedule.stages) and self.settings.selftraining.mixing == "cutmix" \
                and self.unlabeled_batch_size < 2:
            self.print_to_log_file("WARNING: CutMix pairs the unlabelled images of a batch (of each GPU under "
                                   "-num_gpus); with one per batch it pastes an image into itself: raise "
                                   "semisup.unlabeled_batch_ratio or the batch size")

    def on_train_epoch_start(self):
        self.start_stage_epoch(self.schedule.index_at(self.current_epoch))
        self.heads.train()
        super().on_train_epoch_start()
        self.print_to_log_file(f"Stage: {self.current_stage.name}")

    def start_stage_epoch(self, index: int) -> None:
        """An epoch of stage ``index``: the stage entered if it is new, its iterations and its loader."""
        if index != self.stage_index:
            self.enter_stage(index)
        # nnU-Net's loop reads both at the start of every epoch
        self.num_iterations_per_epoch = self.current_stage.iterations
        self.dataloader_train = self.stage_loader(self.current_stage)
        self.steps_this_epoch = 0

    def train_step(self, batch: dict) -> dict:
        stage = self.current_stage
        if stage.is_nnunet_step:
            output = super().train_step(batch)
        else:
            inputs = StepInputs(self, stage, batch)
            output = self.optimizer_step(lambda: self.stage_loss(stage, inputs))
        if stage.reads_teacher:
            self.teacher.update(self.network)
        self.steps_this_epoch += 1
        return output

    def stage_loss(self, stage: Stage, inputs: StepInputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The weighted sum of the stage's terms, and to log: each term (unweighted) and what the terms
        noted (``inputs.logged``)."""
        values = {term.name: getattr(self, f"{term.name}_loss")(inputs) for term in stage.terms}
        total = sum(term.weight_at(self.term_progress(term)) * values[term.name] for term in stage.terms)
        return total, {**values, **inputs.logged}

    # ------------------------------------------------------------ the step's targets and the terms that read them
    def labels_of_target(self, target) -> torch.Tensor:
        """(B, *spatial) long labels from nnU-Net's target (its deep-supervision list or tensor (B, 1, ...)),
        nnU-Net's ignore label as ``EXCLUDED``."""
        labels = full_resolution(target)[:, 0].long()
        if self.label_manager.has_ignore_label:
            labels = torch.where(labels == self.label_manager.ignore_label, EXCLUDED, labels)
        return labels

    def student_view(self, batch: Batch) -> Batch:
        """Self-training: the student's stronger, optionally mixed, view of the batch (``data/mixing.py``)."""
        s = self.settings.selftraining
        return student_batch(batch, s.mixing, s.box_fraction, s.strong_intensity)

    def mixed_labeled_view(self, batch: Batch) -> Batch:
        """``Data.LABELED_MIXED``: BCP's copy-paste between the labelled images (``data/mixing.py``)."""
        return labeled_copy_paste(batch, self.settings.selftraining.box_fraction)

    @cached_property
    def target_loss(self) -> MaskedSegmentationLoss:
        """nnU-Net's loss (Dice + CE, deep supervision, its batch-Dice plan) on the pixels with a target."""
        weights = getattr(self.loss, "weight_factors", None)  # nnU-Net's deep-supervision weights
        return MaskedSegmentationLoss(self.configuration_manager.batch_dice, weights, self.is_ddp)

    def loss_on(self, inputs: StepInputs, labels: torch.Tensor) -> torch.Tensor:
        """``target_loss`` of each decoder's output of the joint pass against ``labels`` (``EXCLUDED``: no
        target). Without batch Dice, over the images with a target only: nnU-Net then averages Dice over
        images, and an image without target would add a constant to that mean and shrink the others'
        weight. Batch Dice sums over the batch, where such an image adds nothing, and under DDP gathers its
        sums from every rank: all images stay, so that every rank gathers the same shapes."""
        if self.target_loss.batch_dice:
            return sum(self.target_loss(output, labels) for output in inputs.joint.outputs)
        images = (labels != EXCLUDED).flatten(1).any(1)
        return sum(self.target_loss(batch_part(output, images), labels[images]) for output in inputs.joint.outputs)

    def segmentation_loss(self, inputs: StepInputs) -> torch.Tensor:
        """nnU-Net's loss on the pixels whose label is true: the labelled images (in the student's mixed
        batch: the pixels that came from them)."""
        return self.loss_on(inputs, inputs.trained.true_labels)

    def pseudo_label_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Self-training: nnU-Net's loss on the pixels with a pseudo-label the labeller trusts."""
        return self.loss_on(inputs, inputs.trained.pseudo_labels)

    def joint_forward(self, images: torch.Tensor, features: bool) -> JointPass:
        """One pass of the network over labelled and unlabelled images; with its last decoder stage
        when a term reads it (else the plain, on CUDA compiled, network)."""
        if not features:
            return JointPass([self.network(images)], None)
        output, decoder_features = forward_with_decoder_features(self.network, images)
        return JointPass([output], decoder_features)

    def optimizer_step(self, compute_loss: Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> dict:
        """One update of the current optimizer. ``compute_loss()`` runs under nnU-Net's autocast on
        CUDA and returns the loss and further values to log; returns nnU-Net's step output. Under DDP
        the network's own gradient hooks stay off and every trained parameter's gradient is averaged
        over ranks (``nnunet_contrast.distributed``): heads and sub-modules run outside DDP's forward."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.network.no_sync() if isinstance(self.network, DistributedDataParallel) else dummy_context():
            with self.autocast_context():
                loss, logged = compute_loss()
            self.backward_and_step(loss)
        return {"loss": loss.detach().cpu().numpy(), **{k: v.detach().cpu().numpy() for k, v in logged.items()}}

    def autocast_context(self):
        """nnU-Net's mixed precision: autocast on CUDA (float16, with its GradScaler), none elsewhere. The
        tests run our steps under the CPU's autocast (bfloat16) through this hook."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's update (gradient scaling on CUDA, clipping at 12) over the optimizer's parameters."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            average_gradients(params)
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)  # nnU-Net's loss line: the mean over ranks under DDP
        train_outputs = [o for rank in gather_objects(train_outputs) for o in rank]  # ours too
        stage = self.current_stage
        means = {term_key(term.name): float(np.mean([float(o[term.name]) for o in train_outputs]))
                 for term in stage.terms if train_outputs and term.name in train_outputs[0]}
        for key, mean in means.items():  # a stage of nnU-Net's own step logs nnU-Net's loss only
            self.print_to_log_file(f"{key} ({stage.name}): {round(mean, 4)}")
        for key in self.logger.local_logger.term_keys:
            self.logger.log(key, means.get(key, float("nan")), self.current_epoch)
        self.logger.log(STAGE_CURVE, self.schedule.names.index(stage.name), self.current_epoch)
        self.logger.log(SUPERVISED_CURVE, float(stage.supervised), self.current_epoch)
        self.log_case_reliability()
        coverage = [float(o[COVERAGE]) for o in train_outputs if COVERAGE in o]
        self.logger.log(KEPT_CURVE, float(np.mean(coverage)) if coverage else float("nan"), self.current_epoch)
        if coverage:
            self.print_to_log_file(f"pseudo-labels kept ({stage.name}): {round(100 * float(np.mean(coverage)), 1)}% "
                                   f"of the unlabelled pixels")

    def on_train_end(self):
        self.dataloader_train = self.dataloader_labeled  # what nnU-Net shuts down
        super().on_train_end()

    # ------------------------------------------------------------ checkpoints
    def checkpoint_extras(self) -> Dict:
        stage = self.current_stage
        return {**super().checkpoint_extras(), "heads": self.heads.state_dict(), "settings": self.settings.as_dict(),
                "optimizer_stage": stage.name if stage else None, "stage_index": self.stage_index,
                "teacher": self.teacher_state(),
                "pseudo_labeler": None if self.pseudo_labeler is None else self.pseudo_labeler.state_dict()}

    def restore_extras(self, extras: Dict, current_epoch: int) -> None:
        """Before nnU-Net restores weights and optimizer state: the heads, and the optimizer of the stage
        the checkpoint was saved in (the next epoch may start a new stage: ``enter_stage`` then runs)."""
        super().restore_extras(extras, current_epoch)
        saved, current = extras.get("settings", {}), self.settings.as_dict()
        if any(saved[name] != current.get(name) for name in saved):  # sections added since are not a difference
            # nnU-Net allows continuing with, e.g., more epochs; stage boundaries move with the settings
            self.print_to_log_file("WARNING: the settings differ from those the checkpoint was trained with; "
                                   "stages follow the current settings (see nnunet_contrast_settings.json)")
        if "heads" in extras:
            self.heads.load_state_dict(extras["heads"])
        if extras.get("teacher") is not None:
            self.start_teacher(extras["teacher"])
        if extras.get("pseudo_labeler") is not None:  # resume mid-round with that round's labels
            self.pseudo_labeler = self.new_snapshot()
            self.pseudo_labeler.load_state_dict(extras["pseudo_labeler"])
        index = extras.get("stage_index")
        if index is None or index >= len(self.schedule.stages) or \
                self.schedule.stages[index].name != extras.get("optimizer_stage"):  # the stages have changed
            index = self.schedule.index_at(max(current_epoch - 1, 0))
        self.stage_index = index
        self.optimizer, self.lr_scheduler = self.stage_optimizer(index)
        if self.current_stage.reads_teacher:  # a checkpoint of settings without a teacher: start one now
            self.start_teacher()
