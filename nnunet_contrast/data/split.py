"""The labelled/unlabelled split of every fold's training cases.

File format (``splits_semisup.json`` beside nnU-Net's ``splits_final.json``)::

    {
      "format": "nnunet-contrast semisup split v1",
      "labeled": "0.05",          # what was asked: a fraction ("0.05") or a count ("10")
      "seed": 0,
      "folds": [                  # index = nnU-Net fold, same order as splits_final.json
        {"labeled": ["hippocampus_001", ...], "unlabeled": ["hippocampus_003", ...]},
        ...
      ]
    }

Validation cases are not listed: they stay as nnU-Net's ``splits_final.json`` defines them.
For each fold the training cases are shuffled with ``seed`` and the first ``n`` keep their labels,
so a smaller fraction with the same seed selects a subset of a larger one.
"""
import json
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

from nnunet_contrast.errors import UserInputError

SPLIT_FORMAT = "nnunet-contrast semisup split v1"


def parse_labeled(text: Union[str, int, float]) -> Union[int, float]:
    """``"0.05"`` -> fraction 0.05; ``"10"`` -> count 10. A fraction must lie in (0, 1]."""
    text = str(text).strip()
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise UserInputError(f"--labeled {text!r} is neither a fraction like 0.05 nor a count like 10") from None
    if isinstance(value, float) and not 0 < value <= 1:
        raise UserInputError(f"labelled fraction {value} is outside (0, 1]: pass e.g. --labeled 0.05, "
                             f"or a case count without a decimal point")
    if isinstance(value, int) and value < 1:
        raise UserInputError(f"labelled count {value} must be at least 1")
    return value


def labeled_count(labeled: Union[int, float], n_train: int, fold: int) -> int:
    n = int(round(labeled * n_train)) if isinstance(labeled, float) else labeled
    if n < 1:
        raise UserInputError(f"fold {fold} would have zero labelled cases ({labeled} of {n_train} training "
                             f"cases): use a larger fraction or a count, e.g. --labeled 1")
    if n > n_train:
        raise UserInputError(f"fold {fold} has only {n_train} training cases, fewer than the {n} asked to be "
                             f"labelled: use a smaller count")
    return n


def make_split(nnunet_folds: Sequence[dict], labeled: Union[int, float], seed: int = 0) -> dict:
    """The semi-supervised split for every fold of nnU-Net's ``splits_final.json`` content."""
    folds = []
    for fold, entry in enumerate(nnunet_folds):
        train = sorted(entry["train"])
        n = labeled_count(labeled, len(train), fold)
        order = np.random.default_rng([seed, fold]).permutation(len(train))
        chosen = {train[i] for i in order[:n]}
        folds.append({"labeled": [k for k in train if k in chosen],
                      "unlabeled": [k for k in train if k not in chosen]})
    return {"format": SPLIT_FORMAT, "labeled": str(labeled), "seed": seed, "folds": folds}


def read_split(path: Path) -> dict:
    """The split file's content; a file that is not JSON gets a one-line error."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}): fix it or recreate it "
                             f"with 'nnunet-contrast split'") from None


def check_disjoint(entry: dict, fold: int, source: str) -> None:
    """A case listed as both labelled and unlabelled in a fold is refused."""
    both = sorted(set(entry["labeled"]) & set(entry["unlabeled"]))
    if both:
        raise UserInputError(f"fold {fold} of {source} lists {len(both)} case(s) as both labelled and unlabelled "
                             f"(e.g. {both[0]}): recreate it with 'nnunet-contrast split'")


def fold_split(split: dict, fold: int, train_keys: Sequence[str], source: str) -> Tuple[List[str], List[str]]:
    """(labelled, unlabelled) training cases of ``fold``, checked against nnU-Net's training cases."""
    if split.get("format") != SPLIT_FORMAT:
        raise UserInputError(f"{source} is not a nnunet-contrast split file: recreate it with "
                             f"'nnunet-contrast split'")
    if not 0 <= fold < len(split["folds"]):
        raise UserInputError(f"{source} has no fold {fold} (it has {len(split['folds'])}): recreate it with "
                             f"'nnunet-contrast split'")
    check_disjoint(split["folds"][fold], fold, source)
    labeled, unlabeled = list(split["folds"][fold]["labeled"]), list(split["folds"][fold]["unlabeled"])
    unknown = sorted(set(labeled + unlabeled) - set(train_keys))
    if unknown:
        raise UserInputError(f"{source} names {len(unknown)} case(s) that are not training cases of fold {fold} "
                             f"(e.g. {unknown[0]}): recreate it with 'nnunet-contrast split'")
    if not labeled:
        raise UserInputError(f"fold {fold} of {source} has zero labelled cases: recreate the split with a larger "
                             f"--labeled")
    missing = sorted(set(train_keys) - set(labeled) - set(unlabeled))
    # training cases the split does not mention (e.g. added to the dataset later) stay unlabelled
    return labeled, unlabeled + missing
