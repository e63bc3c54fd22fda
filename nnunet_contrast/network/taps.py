"""Feature taps on nnU-Net's U-Nets (dynamic_network_architectures: PlainConvUNet,
ResidualEncoderUNet, ...): the encoder's bottleneck and the output of a decoder stage.

They rely on the structure every nnU-Net U-Net shares: ``network.encoder(x)`` returns the skips
(bottleneck last) and ``network.decoder.stages`` holds the decoder stages, last = full resolution.
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network inside DDP and torch.compile wrappers."""
    if hasattr(network, "module") and isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def check_unet(network: nn.Module) -> None:
    net = unwrap_network(network)
    if not (hasattr(net, "encoder") and hasattr(getattr(net, "decoder", None), "stages")):
        raise TypeError(f"{type(net).__name__} is not one of nnU-Net's U-Nets (needs .encoder and "
                        f".decoder.stages); nnunet-contrast trainers need such a network")


def encoder_channels(network: nn.Module) -> int:
    """Channels of the bottleneck (the encoder's last stage)."""
    net = unwrap_network(network)
    return int(net.encoder.output_channels[-1])


def decoder_channels(network: nn.Module, stage: int = -1) -> int:
    """Channels of decoder stage ``stage`` (-1: the last, full-resolution one)."""
    net = unwrap_network(network)
    conv = [m for m in net.decoder.stages[stage].modules() if isinstance(m, nn.modules.conv._ConvNd)][-1]
    return int(conv.out_channels)


def bottleneck_features(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's deepest feature map for input ``x`` (encoder only, no decoder)."""
    return unwrap_network(network).encoder(x)[-1]


@contextmanager
def tap_decoder_stage(network: nn.Module, stage: int = -1) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the output of a decoder stage during the forward passes inside the block.

    Usage::

        with tap_decoder_stage(net) as tap:
            seg = net(x)
        features = tap["features"]
    """
    record: Dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        record["features"] = output

    handle = unwrap_network(network).decoder.stages[stage].register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def forward_with_decoder_features(network: nn.Module, x: torch.Tensor,
                                  stage: int = -1) -> Tuple[object, torch.Tensor]:
    """(segmentation output, features of decoder stage ``stage``) in one forward pass.

    The pass runs the plain network: a graph compiled by torch.compile (nnU-Net compiles on CUDA)
    does not run forward hooks registered after its compilation.
    """
    plain = unwrap_network(network)
    with tap_decoder_stage(plain, stage) as tap:
        output = plain(x)
    return output, tap["features"]


def decoder_stage_count(network: nn.Module) -> int:
    return len(unwrap_network(network).decoder.stages)


def decoder_block_features(network: nn.Module, x: torch.Tensor, blocks: int,
                           train_encoder: bool = True) -> torch.Tensor:
    """Output of the first ``blocks`` decoder stages (counted from the bottleneck, as the decoder
    blocks d_l of Chaitanya et al. 2020) without running the rest of the decoder.
    ``train_encoder=False`` runs the encoder without gradient (a frozen encoder)."""
    net = unwrap_network(network)
    if not 1 <= blocks <= len(net.decoder.stages):
        raise ValueError(f"decoder block {blocks} does not exist: the network has {len(net.decoder.stages)} "
                         f"decoder stages")
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        skips = net.encoder(x)
    features = skips[-1]
    for s in range(blocks):  # nnU-Net's UNetDecoder: upsample, concatenate the skip, convolve
        upsampled = net.decoder.transpconvs[s](features)
        features = net.decoder.stages[s](torch.cat((upsampled, skips[-(s + 2)]), 1))
    return features


def decoder_block_parameters(network: nn.Module, blocks: int) -> List[nn.Parameter]:
    """Parameters of the first ``blocks`` decoder stages and their upsampling layers."""
    net = unwrap_network(network)
    modules = list(net.decoder.transpconvs[:blocks]) + list(net.decoder.stages[:blocks])
    return [p for m in modules for p in m.parameters()]


def total_stride(network: nn.Module, dims: int = 2) -> Tuple[int, ...]:
    """Per spatial axis, the product of the encoder's stage strides (input size / bottleneck size)."""
    product = [1] * dims
    for stride in unwrap_network(network).encoder.strides:
        stride = stride if isinstance(stride, (list, tuple)) else [stride] * dims
        product = [p * int(s) for p, s in zip(product, stride)]
    return tuple(product)
