"""nnU-Net's training log and progress.png, extended with the contrastive loss, the stage and the
EMA teacher's validation Dice (NaN in epochs without a teacher)."""
import io
import math
from os.path import join
from typing import Sequence

from nnunetv2.training.logging.nnunet_logger import LocalLogger

CONTRAST_KEYS = ("contrast_loss", "stage", "teacher_dice")


class ContrastLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with more per-epoch entries; progress.png gets a fourth panel."""

    def __init__(self, stage_names: Sequence[str], verbose: bool = False):
        super().__init__(verbose)
        for key in CONTRAST_KEYS:
            self.my_fantastic_logging[key] = []
        self.stage_names = list(stage_names)

    def load_checkpoint(self, checkpoint: dict):
        """A checkpoint written before an entry existed gets it as NaN for its epochs."""
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging.get("epoch_end_timestamps", []))
        for key in CONTRAST_KEYS:
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
        losses = self.my_fantastic_logging["contrast_loss"][:epochs]
        stages = self.my_fantastic_logging["stage"][:epochs]
        fig, ax = plt.subplots(1, 1, figsize=(width_px / 100, 12), dpi=100)
        colours = ["tab:orange", "tab:purple", "tab:green", "tab:red", "tab:cyan"]
        for index, name in enumerate(self.stage_names):
            epochs_of_stage = [e for e, s in enumerate(stages) if s == index]
            if not epochs_of_stage:
                continue
            colour = colours[index % len(colours)]
            ax.axvspan(min(epochs_of_stage) - 0.5, max(epochs_of_stage) + 0.5, alpha=0.15, color=colour,
                       label=f"stage: {name}")
            points = [(e, losses[e]) for e in epochs_of_stage if not math.isnan(losses[e])]
            if points:  # each stage has its own loss: one line per stage
                ax.plot(*zip(*points), color=colour, marker="o", linewidth=4, label=f"{name} loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("contrastive loss")
        ax.legend(loc=(0, 1), ncol=len(self.stage_names) + 1)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
