"""What a benchmark is made of: runs (a trainer, a labelled fraction, a fold) and the steps that make them,
shared by ``runs.py`` (the benchmark) and ``recipe.py`` (the maintainers' recipe as a row)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

BASELINE = "nnUNetTrainerLabeledOnly"
RECIPE = "RetrainOnPredictions"  # the maintainers' recipe (recipe.py): a row of the tables, not a trainer
ALL_LABELS = "1.0"   # the upper bound: the baseline trained on every training case of the fold
FROM = "@"  # a row TARGET@SOURCE: TARGET trained from SOURCE's checkpoint_pretrained.pth (nnU-Net's -pretrained_weights)


@dataclass(frozen=True)
class Run:
    trainer: str
    fraction: str
    fold: int

    @property
    def is_upper_bound(self) -> bool:
        return self.fraction == ALL_LABELS and self.trainer == BASELINE

    @property
    def nnunet_trainer(self) -> str:
        """The trainer class nnU-Net trains (``-tr``): TARGET of a row TARGET@SOURCE."""
        return self.trainer.split(FROM)[0]

    @property
    def pretrained_by(self) -> Optional[str]:
        """SOURCE of a row TARGET@SOURCE, whose pretraining TARGET starts from; else None."""
        return self.trainer.split(FROM)[1] if FROM in self.trainer else None


@dataclass
class Step:
    """One thing to do; ``done`` exists once it has been done. Either a command or a Python action."""
    describe: str
    done: Path
    command: Optional[List[str]] = None
    action: Optional[Callable[[], None]] = None
    before: Optional[Callable[[], None]] = None
    resume_if: Sequence[Path] = ()       # add nnU-Net's --c when one of these files exists
    start_only: Sequence[str] = ()       # arguments of a fresh start only (nnU-Net refuses -pretrained_weights with --c)
    log: Optional[Path] = None
    stamp: bool = False                  # ``done`` is a stamp written after success, not the command's output
    env: Optional[dict] = None           # the command's environment, when not the benchmark's
    missing: Optional[str] = None        # what it means, and what to do, when the command ends without ``done``

    def command_now(self) -> List[str]:
        resume = any(p.exists() for p in self.resume_if)
        return self.command + (["--c"] if resume else list(self.start_only))
