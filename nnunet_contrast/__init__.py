"""nnunet-contrast: semi-supervised contrastive learning trainers for nnU-Net v2.

This module stays free of heavy imports: ``nnunet_contrast.pth`` imports ``nnunet_contrast._autoload``
at every interpreter start.
"""
__version__ = "0.1.0"
