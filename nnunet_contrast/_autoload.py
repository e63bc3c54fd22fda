"""Runs at interpreter start (via ``nnunet_contrast.pth``): lets nnU-Net find our trainers, and
ends nnU-Net's commands with one readable line when our trainers refuse bad input.

nnU-Net v2.8 searches the folders listed in ``nnUNet_extTrainer`` (``os.pathsep``-separated) for
trainer classes it does not ship. We append our ``trainers`` folder and keep whatever the user set.
A ``UserInputError`` (``nnunet_contrast.errors``) that nobody catches, e.g. raised by a trainer inside
``nnUNetv2_train``, prints as its one-line message without the traceback; every other exception
prints as before. This must never break interpreter start-up, hence the broad ``except``.
"""
import os
import sys


def register_trainer_folder(environ=os.environ) -> None:
    from nnunet_contrast.resources import bundled_dir

    folder = str(bundled_dir("trainers"))
    current = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])


def one_line_user_errors(previous_hook=sys.excepthook):
    """An exception hook that prints a ``UserInputError`` as one line and hands the rest on."""
    def hook(kind, error, traceback):
        from nnunet_contrast.errors import UserInputError

        if issubclass(kind, UserInputError):
            print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {error}", file=sys.stderr)
        else:
            previous_hook(kind, error, traceback)
    return hook


try:
    register_trainer_folder()
    sys.excepthook = one_line_user_errors()
except Exception:  # noqa: BLE001 - a broken install must not break every Python start
    pass
