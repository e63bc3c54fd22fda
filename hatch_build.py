"""Build hook: an editable install ships only the start-up hook ``nnunet_contrast.pth``; the
trainers and presets are then read from the checkout (see nnunet_contrast/resources.py), not
copied into site-packages as for a regular install."""
from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class EditableHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            build_data["force_include_editable"] = {"nnunet_contrast.pth": "nnunet_contrast.pth"}
