"""nnU-Net's training log and progress.png, extended with each loss term other than nnU-Net's own
(``<term>_loss``, NaN in epochs whose stage lacks it), the stage (and whether it is supervised: a fine-tuning
stage, whose pseudo Dice means something) and the EMA teacher's quality on the
validation batches and the share of its pseudo-labels kept in training (``teacher_*``, NaN in epochs
without a teacher)."""
import io
import math
from os.path import join
from typing import Sequence

from nnunetv2.training.logging.nnunet_logger import LocalLogger


KEPT_CURVE = "teacher_kept_share"  # per training epoch: the share of unlabelled pixels whose pseudo-label was kept
STAGE_CURVE, SUPERVISED_CURVE = "stage", "supervised"  # per epoch: the stage's index; 1 where it trains nnU-Net's loss


def term_key(term_name: str) -> str:
    """The log entry of a loss term."""
    return f"{term_name}_loss"


class ContrastLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with more per-epoch entries; progress.png gets a fourth panel."""

    def __init__(self, stage_names: Sequence[str], term_names: Sequence[str], teacher_keys: Sequence[str] = (),
                 verbose: bool = False):
        super().__init__(verbose)
        self.term_keys = [term_key(name) for name in term_names]
        self.added_keys = [STAGE_CURVE, SUPERVISED_CURVE, *teacher_keys, *self.term_keys]
        for key in self.added_keys:
            self.my_fantastic_logging[key] = []
        self.stage_names = list(stage_names)

    def load_checkpoint(self, checkpoint: dict):
        """A checkpoint of other settings (a term its stages lacked) gets the entry as NaN for its epochs."""
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging.get("epoch_end_timestamps", []))
        for key in self.added_keys:
            self.my_fantastic_logging.setdefault(key, [math.nan] * epochs)

    def plot_progress_png(self, output_folder):
        super().plot_progress_png(output_folder)
        from PIL import Image

        path = join(output_folder, "progress.png")
        with Image.open(path) as base:
            panel = self._contrast_panel(base.width)
            combined = Image.new("RGB", (base.width, base.height + panel.height), "white")
            combined.paste(base.convert("RGB"), (0, 0))
        combined.paste(panel, (0, combined.height - panel.height))
        combined.save(path)

    def _contrast_panel(self, width_px: int):
        import matplotlib.pyplot as plt
        from PIL import Image

        epochs = min(len(v) for v in self.my_fantastic_logging.values())
        stages = self.my_fantastic_logging[STAGE_CURVE][:epochs]
        fig, ax = plt.subplots(1, 1, figsize=(width_px / 100, 12), dpi=100)
        colours = ["tab:orange", "tab:purple", "tab:green", "tab:red", "tab:cyan"]
        for index, name in enumerate(self.stage_names):
            epochs_of_stage = [e for e, s in enumerate(stages) if s == index]
            if epochs_of_stage:
                ax.axvspan(min(epochs_of_stage) - 0.5, max(epochs_of_stage) + 0.5, alpha=0.15,
                           color=colours[index % len(colours)], label=f"stage: {name}")
        for key in self.term_keys:  # each term its own line, over the epochs that have it
            points = [(e, v) for e, v in enumerate(self.my_fantastic_logging[key][:epochs]) if not math.isnan(v)]
            if points:
                ax.plot(*zip(*points), marker="o", linewidth=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss terms (unweighted)")
        ax.legend(loc=(0, 1), ncol=len(self.stage_names) + len(self.term_keys))
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
