"""Where the bundled folders (trainers, plans presets, sample data) live.

A regular install copies ``trainers/`` and ``plans/`` into the package; a source checkout or an
editable install keeps them at the repository root, next to the package.
"""
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """Return the bundled folder ``name`` (``trainers``, ``plans``) of this installation."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nnunet-contrast is installed without its '{name}' folder; "
                            f"reinstall it with 'pip install .' from the repository")


def sample_dir() -> Path:
    """The embedded Hippocampus sample (MSD layout), shipped inside the package."""
    return _PACKAGE_DIR / "sample_data" / "Task04_Hippocampus"
