"""Build hook.

* An editable install ships only the start-up hook ``nnunet_contrast.pth``; the trainers and presets
  are then read from the checkout (see nnunet_contrast/resources.py), not copied into site-packages.
* A regular install from a git checkout records the checkout's commit in ``nnunet_contrast/COMMIT``, so
  that benchmark records name the code they ran (``commands/benchmark/records.py``)."""
import subprocess
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class EditableHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            build_data["force_include_editable"] = {"nnunet_contrast.pth": "nnunet_contrast.pth"}
            return
        commit = checkout_commit(Path(self.root))
        if commit:
            recorded = Path(self.directory) / "COMMIT"
            recorded.parent.mkdir(parents=True, exist_ok=True)
            recorded.write_text(commit + "\n")
            build_data["force_include"][str(recorded)] = "nnunet_contrast/COMMIT"


def checkout_commit(folder: Path) -> str:
    """``git describe`` of the checkout holding ``folder`` ('' outside a checkout or without git)."""
    try:
        result = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty", "--abbrev=7"],
                                capture_output=True, text=True)
    except OSError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""
