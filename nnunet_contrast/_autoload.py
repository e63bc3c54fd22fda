"""Runs at interpreter start (via ``nnunet_contrast.pth``): lets nnU-Net find our trainers.

nnU-Net v2.8 searches the folders listed in ``nnUNet_extTrainer`` (``os.pathsep``-separated) for
trainer classes it does not ship. We append our ``trainers`` folder and keep whatever the user set.
This must never break interpreter start-up, hence the broad ``except``.
"""
import os


def register_trainer_folder(environ=os.environ) -> None:
    from nnunet_contrast.resources import bundled_dir

    folder = str(bundled_dir("trainers"))
    current = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])


try:
    register_trainer_folder()
except Exception:  # noqa: BLE001 - a broken install must not break every Python start
    pass
