"""A run as data: an ordered list of stages, each saying what trains, with which optimizer, on which
loss terms with which weights, on which data, and which pseudo-labeller it reads. ``MethodTrainer`` (``training/method.py``) reads
it for everything that depends on stages: boundaries, optimizers, iterations, the log line, the
progress.png shading, checkpoint_best and ``--c``.
"""
import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, List, Optional, Sequence, Tuple, Union


class Data(Enum):
    """What a stage reads."""
    LABELED = "labelled batch"                                 # nnU-Net's loader over the labelled cases
    LABELED_MIXED = "labelled batch, copy-pasted between its images"  # the same, mixed (data/mixing.py, BCP)
    LABELED_AND_UNLABELED = "labelled + unlabelled batch"      # the same, plus an unlabelled batch (images only)
    ALL_IMAGES = "all images"                                  # every training case and added image, labels dropped
    PARTITIONS = "all images, partition batches"               # the same, drawn as volumes x slice partitions
    STUDENT = "the student's batch"  # self-training: the labelled and unlabelled batch as the student sees it,
    #                                  each pixel with its target (data/mixing.py)


class Labeller(Enum):
    """Which pseudo-labeller a stage reads (``training/pseudo_labels.py``)."""
    NONE = "none"
    EMA_TEACHER = "the EMA teacher"        # follows the network after every step of the stages that read it
    SNAPSHOT = "a snapshot per round"      # a frozen copy of the network taken when each such stage starts


class Views(Enum):
    """The two augmented views a stage's terms see (``data/views.py``), or none."""
    NONE = "none"
    SPATIAL = "spatial + intensity"
    INTENSITY = "intensity"


@dataclass(frozen=True)
class Part:
    """A part of the model that a stage trains; ``MethodTrainer.parameters_of`` gives its parameters, and a
    trainer may define parts of its own (e.g. IDEAL's decoder)."""
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Head(Part):
    """One projection head of the trainer's ``build_heads``."""

    def __str__(self) -> str:
        return f"head {self.name}"


NETWORK, ENCODER, HEADS = Part("network"), Part("encoder"), Part("heads")  # HEADS: every projection head

SEGMENTATION = "segmentation"  # nnU-Net's loss (Dice + CE, deep supervision) on the labelled images
PSEUDO_LABEL = "pseudo_label"  # self-training: nnU-Net's loss on the EMA teacher's confident pseudo-labels


@dataclass(frozen=True)
class NnUNetSGD:
    """nnU-Net's SGD and poly learning rate, over the consecutive stages that share it."""


@dataclass(frozen=True)
class Adam:
    """Adam with a constant learning rate (the papers' pretraining)."""
    lr: float
    weight_decay: float = 0.0


Weight = Union[float, Callable[[float], float]]


@dataclass(frozen=True)
class Term:
    """A loss term: the trainer's method ``<name>_loss(inputs)``, times ``weight``; a weight may be a
    function of the term's progress in [0, 1) (e.g. ``sigmoid_rampup``): the share of the iterations of
    all stages with this term done so far. ``features``: the term reads the last decoder stage of the
    joint forward pass (the pass then taps it)."""
    name: str
    weight: Weight = 1.0
    features: bool = False

    def weight_at(self, progress: float) -> float:
        return self.weight(progress) if callable(self.weight) else self.weight


def epochs_of(fraction: float, epochs: int) -> int:
    """``fraction`` of ``epochs``, rounded half up: the length of a stage set as a share of the budget."""
    return int(fraction * epochs + 0.5)


def sigmoid_rampup(length: float) -> Callable[[float], float]:
    """exp(-5 (1 - t / length)^2) for t < length, then 1 (Laine & Aila 2017); ``length`` in [0, 1]
    is a fraction of the stage."""
    def weight(progress: float) -> float:
        if length <= 0 or progress >= length:
            return 1.0
        return math.exp(-5.0 * (1.0 - progress / length) ** 2)
    return weight


def ramped(weight: float, length: float) -> Weight:
    """``weight`` after a sigmoid ramp over the first ``length`` of the term's iterations (``weight`` when 0)."""
    if length <= 0:
        return weight
    ramp = sigmoid_rampup(length)
    return lambda progress: weight * ramp(progress)


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    iterations: int                 # per epoch
    trains: Tuple[Part, ...]
    optimizer: Union[NnUNetSGD, Adam]
    terms: Tuple[Term, ...]
    data: Data = Data.LABELED
    views: Views = Views.NONE
    labeller: Labeller = Labeller.NONE

    def __post_init__(self):
        if self.data == Data.STUDENT and self.labeller != Labeller.EMA_TEACHER:
            raise ValueError(f"stage '{self.name}': the student's batch is labelled by the EMA teacher, not by "
                             f"{self.labeller.value}")
        names = {t.name for t in self.terms}
        if SEGMENTATION in names and self.data in (Data.ALL_IMAGES, Data.PARTITIONS):
            raise ValueError(f"stage '{self.name}': the {SEGMENTATION} term needs labelled images, which "
                             f"{self.data.value} drops")
        if PSEUDO_LABEL in names and self.labeller == Labeller.NONE:
            raise ValueError(f"stage '{self.name}': the {PSEUDO_LABEL} term needs a labeller")
        if self.labeller != Labeller.NONE and not self.reads_unlabeled:
            raise ValueError(f"stage '{self.name}': {self.labeller.value} labels unlabelled images, which the stage "
                             f"does not read (data: {self.data.value})")

    @property
    def reads_unlabeled(self) -> bool:
        return self.data in (Data.LABELED_AND_UNLABELED, Data.STUDENT)

    @property
    def reads_teacher(self) -> bool:
        """Reads the EMA teacher, which then follows the network after every step of the stage."""
        return self.labeller == Labeller.EMA_TEACHER

    @property
    def supervised(self) -> bool:
        """Trains nnU-Net's segmentation loss: a fine-tuning stage (the others are pretraining), whose
        pseudo Dice means something (checkpoint_best)."""
        return any(t.name == SEGMENTATION for t in self.terms)

    @property
    def is_nnunet_step(self) -> bool:
        """Exactly nnU-Net's own training step: its loss alone, on its labelled batch."""
        return [t.name for t in self.terms] == [SEGMENTATION] and self.data == Data.LABELED and \
            self.terms[0].weight == 1.0

    def optimizer_key(self):
        """Consecutive stages with the same key share one optimizer and learning-rate schedule."""
        return self.optimizer, self.trains


def replace_finetuning(stages: Sequence[Stage], replacement: Sequence[Stage]) -> List[Stage]:
    """A method's fine-tuning (supervised) stages swapped for ``replacement``, after its pretraining
    stages (the ``run.finetune`` setting)."""
    return [s for s in stages if not s.supervised] + list(replacement)


class Schedule:
    """The stages of a run (stages of zero epochs left out) and the epochs they cover."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages: List[Stage] = [s for s in stages if s.epochs > 0]
        if not self.stages:
            raise ValueError("no stage has any epochs: raise nnunet_contrast.budget.num_epochs or a stage's epochs "
                             "in the plans")
        self.starts = [sum(s.epochs for s in self.stages[:i]) for i in range(len(self.stages))]

    @property
    def total_epochs(self) -> int:
        return self.starts[-1] + self.stages[-1].epochs

    @property
    def pretraining_end(self) -> Optional[int]:
        """The first supervised stage where stages without nnU-Net's segmentation loss come before it (the
        run pretrains), else None."""
        first = next((i for i, s in enumerate(self.stages) if s.supervised), None)
        return first or None

    def index_at(self, epoch: int) -> int:
        """The stage of ``epoch`` (the last stage after the end, as nnU-Net may train on with ``--c``)."""
        return max([i for i, start in enumerate(self.starts) if start <= epoch], default=0)

    def index_of(self, name: str) -> int:
        """The first stage called ``name``."""
        return [s.name for s in self.stages].index(name)

    def stage(self, name: str) -> Stage:
        return self.stages[self.index_of(name)]

    @property
    def names(self) -> List[str]:
        """Distinct stage names in order: the shading of progress.png (rounds of one name share a colour)."""
        return list(dict.fromkeys(s.name for s in self.stages))

    def span(self, index: int) -> Tuple[int, int]:
        """(first epoch, epochs) of the consecutive stages that share stage ``index``'s optimizer."""
        key = self.stages[index].optimizer_key()
        first = last = index
        while first > 0 and self.stages[first - 1].optimizer_key() == key:
            first -= 1
        while last + 1 < len(self.stages) and self.stages[last + 1].optimizer_key() == key:
            last += 1
        return self.starts[first], self.starts[last] + self.stages[last].epochs - self.starts[first]

    def term_progress(self, name: str, index: int, done_in_stage: int) -> float:
        """The share of the iterations of all stages with term ``name`` done after ``done_in_stage``
        iterations of stage ``index``."""
        with_term = [i for i, s in enumerate(self.stages) if any(t.name == name for t in s.terms)]
        total = sum(self.stages[i].epochs * self.stages[i].iterations for i in with_term)
        before = sum(self.stages[i].epochs * self.stages[i].iterations for i in with_term if i < index)
        return (before + done_in_stage) / total

    def shares_optimizer(self, a: int, b: int) -> bool:
        return self.span(a) == self.span(b)

    def describe(self) -> str:
        return "; ".join(f"{s.name}: epochs {start}-{start + s.epochs - 1} x {s.iterations} it, trains "
                         f"{' + '.join(map(str, s.trains))}, terms {', '.join(_term_text(t) for t in s.terms)}, "
                         f"data: {s.data.value}" + (f", two views ({s.views.value})" if s.views != Views.NONE else "")
                         + (f", pseudo-labels of {s.labeller.value}" if s.labeller != Labeller.NONE else "")
                         for s, start in zip(self.stages, self.starts))


def _term_text(term: Term) -> str:
    return term.name if term.weight == 1.0 else (f"{term.name} (ramped)" if callable(term.weight)
                                                 else f"{term.weight} x {term.name}")
