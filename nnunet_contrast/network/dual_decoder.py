"""IDEAL's fine-tuning network (Basak et al. 2023): nnU-Net's planned U-Net with a second decoder
that upsamples by bilinear interpolation (trilinear in 3D) instead of transposed convolutions.

``DualDecoderUNet`` is what ``nnUNetTrainerIDEAL.build_network_architecture`` returns, so nnU-Net's
training, validation, ``nnUNetv2_predict``, ensembling and ``find_best_configuration`` use it as
they use the plain U-Net. Its ``forward`` returns ONE segmentation: per output resolution, the
logarithm of the mean of both decoders' softmax. nnU-Net applies a softmax to network outputs, and
``softmax(log(p)) = p`` for probabilities ``p``, so the probabilities nnU-Net exports are exactly
the mean of both decoders' probabilities. ``forward_both`` gives each decoder's own logits, and so does
``forward`` while ``both_outputs`` is set: IDEAL's training calls the network as nnU-Net holds it (compiled
by ``torch.compile`` on CUDA), which runs ``forward`` only.
"""
import copy
import math
from typing import List, Tuple, Union

import torch
from torch import nn

from nnunet_contrast.network.heads import convolution

Output = Union[torch.Tensor, List[torch.Tensor]]


class BilinearUpsampling(nn.Module):
    """Bilinear (2D) or trilinear (3D) interpolation by ``stride``, one factor per spatial axis, then a
    1x1 convolution to ``out_channels`` (the transposed convolution it replaces changes the channel count
    too). A single number is a 2D stride."""

    def __init__(self, in_channels: int, out_channels: int, stride):
        super().__init__()
        self.stride = tuple(int(s) for s in stride) if isinstance(stride, (list, tuple)) else (int(stride),) * 2
        self.conv = convolution(len(self.stride))(in_channels, out_channels, 1)
        self.mode = "trilinear" if len(self.stride) == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [side * s for side, s in zip(x.shape[2:], self.stride)]
        return self.conv(nn.functional.interpolate(x, size=size, mode=self.mode, align_corners=False))


def bilinear_decoder_like(decoder: nn.Module, initialize) -> nn.Module:
    """A copy of nnU-Net's ``UNetDecoder`` with every transposed convolution replaced by
    ``BilinearUpsampling`` and all weights re-initialised with ``initialize`` (two decoders that
    start identical would agree everywhere, and cross pseudo-supervision would teach nothing).
    The copy runs nnU-Net's own ``UNetDecoder.forward`` and shares the encoder it refers to."""
    encoder = decoder.encoder
    bilinear = copy.deepcopy(decoder, memo={id(encoder): encoder})
    bilinear.transpconvs = nn.ModuleList(
        BilinearUpsampling(t.in_channels, t.out_channels, t.stride) for t in decoder.transpconvs)
    for name, child in bilinear.named_children():
        if child is not encoder:
            child.apply(initialize)
    return bilinear


def mean_probability_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log((softmax(a) + softmax(b)) / 2) over dim 1, computed stably (float32)."""
    stacked = torch.stack([a.float().log_softmax(1), b.float().log_softmax(1)])
    return stacked.logsumexp(0) - math.log(2.0)


class DualDecoderUNet(nn.Module):
    """Args:
        unet: one of nnU-Net's U-Nets (``.encoder``, ``.decoder`` a ``UNetDecoder``), 2D or 3D.
        initialize: weight initialisation for the second decoder (nnU-Net's He init).

    ``encoder`` and ``decoder`` stay those of ``unet`` (nnU-Net's ``set_deep_supervision_enabled``
    and the feature taps find them there); ``decoder_bilinear`` follows ``decoder.deep_supervision``.
    """

    def __init__(self, unet: nn.Module, initialize):
        super().__init__()
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.decoder_bilinear = bilinear_decoder_like(unet.decoder, initialize)
        self.both_outputs = False

    def forward_both(self, x: torch.Tensor) -> Tuple[Output, Output]:
        """(logits of the transposed-conv decoder, logits of the bilinear decoder); lists from the
        highest resolution down when deep supervision is on."""
        skips = self.encoder(x)
        self.decoder_bilinear.deep_supervision = self.decoder.deep_supervision
        return self.decoder(skips), self.decoder_bilinear(skips)

    def forward(self, x: torch.Tensor) -> Union[Output, Tuple[Output, Output]]:
        first, second = self.forward_both(x)
        if self.both_outputs:
            return first, second
        if isinstance(first, (list, tuple)):
            return [mean_probability_logits(a, b) for a, b in zip(first, second)]
        return mean_probability_logits(first, second)
