"""Which of the EMA teacher's pseudo-labels to keep (``selftraining.threshold``), per pixel by the class
the teacher gives it.

* ``FixedThreshold`` (``fixed``): a pixel keeps its label when the teacher's softmax maximum is at least
  ``confidence_threshold`` (the mean teacher's and UniMatch's rule; UniMatch uses 0.95).
* ``SelfAdaptiveThreshold`` (``self_adaptive``): FreeMatch's self-adaptive threshold (Wang et al., ICLR
  2023, Eq. 5-9) over the pixels of the unlabelled batches the teacher labels, q_p its softmax at pixel p::

      tau    <- m tau    + (1 - m) mean_p max_c q_p(c)          (global, Eq. 5-6)
      p~(c)  <- m p~(c)  + (1 - m) mean_p q_p(c)                (class-wise, Eq. 7)
      tau(c) =  p~(c) / max_c' p~(c') * tau                     (Eq. 8-9)

  and a pixel keeps its label c = argmax q_p when max q_p >= tau(c). Both start at 1/C; m is
  ``threshold_momentum`` (FreeMatch: 0.999, over a million iterations). The background, which holds most
  pixels, gets the global threshold (about the mean confidence, so its least confident pixels are left
  out), and a class the teacher rarely predicts a lower one, so that it keeps its pixels. Under DDP the
  means run over every rank's pixels, so that all ranks keep the same thresholds.
"""
from typing import Dict, Union

import torch

from nnunet_contrast.distributed import summed_over_ranks

THRESHOLDS = ("fixed", "self_adaptive")


class FixedThreshold:
    def __init__(self, threshold: float):
        if not 0 <= threshold <= 1:
            raise ValueError(f"FixedThreshold: the threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def of(self, labels: torch.Tensor) -> torch.Tensor:
        """The threshold of each pixel (labels: the teacher's argmax, (B, *spatial))."""
        return torch.full(labels.shape, self.threshold, device=labels.device)

    def update(self, probabilities: torch.Tensor) -> None:
        pass

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        pass


class SelfAdaptiveThreshold:
    """Args:
        num_classes: C, the teacher's output channels.
        momentum: m in [0, 1).
    """

    def __init__(self, num_classes: int, momentum: float):
        if num_classes < 1 or not 0 <= momentum < 1:
            raise ValueError(f"SelfAdaptiveThreshold: needs at least one class and a momentum in [0, 1), got "
                             f"{num_classes} and {momentum}")
        self.momentum = momentum
        self.tau = torch.tensor(1.0 / num_classes, dtype=torch.float64)
        self.class_mean = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    def thresholds(self) -> torch.Tensor:
        """(C,) float64: tau(c) of each class."""
        return self.class_mean / self.class_mean.max() * self.tau

    def of(self, labels: torch.Tensor) -> torch.Tensor:
        return self.thresholds().to(labels.device, torch.float32)[labels]

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor) -> None:
        """One step of the averages, from the teacher's softmax (B, C, *spatial) of an unlabelled batch."""
        probabilities = probabilities.detach().double()
        pixels = summed_over_ranks(torch.tensor(float(probabilities[:, 0].numel()), device=probabilities.device))
        mean_max = summed_over_ranks(probabilities.amax(1).sum()) / pixels
        class_mean = summed_over_ranks(probabilities.transpose(0, 1).flatten(1).sum(1)) / pixels
        m = self.momentum
        self.tau = m * self.tau + (1 - m) * mean_max.cpu()
        self.class_mean = m * self.class_mean + (1 - m) * class_mean.cpu()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"tau": self.tau.clone(), "class_mean": self.class_mean.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.tau, self.class_mean = state["tau"].clone(), state["class_mean"].clone()


Threshold = Union[FixedThreshold, SelfAdaptiveThreshold]


def threshold_of(settings, num_classes: int) -> Threshold:
    """The threshold ``selftraining`` settings name, for a teacher with ``num_classes`` outputs."""
    if settings.threshold == "self_adaptive":
        return SelfAdaptiveThreshold(num_classes, settings.threshold_momentum)
    return FixedThreshold(settings.confidence_threshold)
