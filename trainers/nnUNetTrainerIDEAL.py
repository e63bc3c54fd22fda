"""nnUNetTrainerIDEAL: Basak et al., "IDEAL: Improved DEnse LocAL contrastive learning for
semi-supervised medical image segmentation", ICASSP 2023 (../shared/docs/methods.md, section 5).

One nnU-Net run in two stages (settings in ``nnunet_contrast.ideal`` of the plans):
1. ``dense``: the encoder, nnU-Net's decoder and a 1x1-conv projection head learn the dense InfoNCE
   ``L_loc`` on two intensity-only views of labelled and unlabelled images (labels unused): each
   position of the query view against the same position of the key view (no gradient through
   the key path), the key view's other positions as negatives; Adam.
2. ``finetune``: the network is ``DualDecoderUNet`` (nnU-Net's transposed-conv decoder and a
   bilinear one on the shared encoder, both with deep supervision), trained with nnU-Net's SGD and
   poly schedule on ``L_SSF``: nnU-Net's loss of each decoder on the labelled batch, plus
   ``lambda_cps`` x cross pseudo-supervision on the unlabelled batch (each decoder learns the other's
   argmax). Inference (``nnUNetv2_predict``) sees one output: the mean of both decoders' softmax.
"""
import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_contrast.augment import two_views
from nnunet_contrast.dual_decoder import DualDecoderUNet
from nnunet_contrast.heads import DenseProjectionHead
from nnunet_contrast.losses import CrossPseudoSupervisionLoss, DenseInfoNCELoss
from nnunet_contrast.pixel_selection import sample_positions
from nnunet_contrast.taps import (check_unet, decoder_block_features, decoder_block_parameters, decoder_channels,
                                  decoder_stage_count, unwrap_network)
from nnunet_contrast.training.contrast import batch_part
from nnunet_contrast.training.staged import FINETUNE, Stage, StagedContrastTrainer


class nnUNetTrainerIDEAL(StagedContrastTrainer):
    presets = ("base", "ideal_basak2023")
    method_key = "ideal"
    requires_unlabeled = True

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned U-Net with a second, bilinear decoder; nnUNetv2_predict calls this too."""
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        check_unet(unet)
        return DualDecoderUNet(unet, getattr(unet, "initialize", InitWeights_He(1e-2)))

    def initialize(self):
        super().initialize()
        s = self.method_settings
        self.dense_loss = DenseInfoNCELoss(s["temperature"])
        weights = getattr(self.loss, "weight_factors", None)  # nnU-Net's deep-supervision weights
        cps = CrossPseudoSupervisionLoss()
        self.cps_loss = DeepSupervisionWrapper(cps, weights) if weights is not None else cps

    def pretraining_stages(self):
        return [Stage("dense", self.method_settings["pretrain_epochs"])]

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({"dense": DenseProjectionHead(decoder_channels(self.network), s["head_hidden"],
                                                           s["embedding_dim"])})

    def stage_parameters(self, stage: str):
        """Pretraining: the encoder, nnU-Net's decoder (without its segmentation layers) and the head."""
        net = unwrap_network(self.network)
        return list(net.encoder.parameters()) + \
            decoder_block_parameters(net, decoder_stage_count(net)) + list(self.heads["dense"].parameters())

    # ------------------------------------------------------------ pretraining
    def contrast_loss(self, stage: str, batch: dict) -> torch.Tensor:
        """``L_loc`` on two intensity-only views (positions stay aligned) of labelled and unlabelled images."""
        query_view, key_view = two_views(self.labeled_and_unlabeled_images(batch), spatial=False)
        queries = self.dense_embeddings(query_view)
        with torch.no_grad():  # the key path has stop-gradient
            keys = self.dense_embeddings(key_view)
        positions = sample_positions(queries.shape[1], self.method_settings["sampled_positions"], queries.device)
        return self.dense_loss(queries[:, positions], keys[:, positions])

    def dense_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H*W, D): the head on the last stage of nnU-Net's decoder, one vector per pixel."""
        features = decoder_block_features(self.network, images, decoder_stage_count(self.network))
        return self.heads["dense"](features).flatten(2).transpose(1, 2)

    # ------------------------------------------------------------ fine-tuning
    def train_step(self, batch: dict) -> dict:
        if self.current_stage != FINETUNE:
            return super().train_step(batch)
        unlabeled = self.next_unlabeled_images()

        def loss():
            supervised, cps = self.finetune_losses(batch, unlabeled)
            return supervised + self.method_settings["lambda_cps"] * cps, {"cps": cps}
        return self.optimizer_step(loss)

    def finetune_losses(self, batch: dict, unlabeled):
        """(nnU-Net's loss of both decoders on the labelled batch, cross pseudo-supervision on the
        unlabelled batch; 0 without one). One pass over both batches (per-instance normalisation)."""
        data, target = self.labeled_batch_on_device(batch)
        images = data if unlabeled is None else torch.cat([data, unlabeled.to(self.device, non_blocking=True)])
        first, second = unwrap_network(self.network).forward_both(images)
        labeled, rest = slice(0, data.shape[0]), slice(data.shape[0], None)
        supervised = self.loss(batch_part(first, labeled), target) + self.loss(batch_part(second, labeled), target)
        if unlabeled is None:
            return supervised, supervised.new_zeros(())
        return supervised, self.cps_loss(batch_part(first, rest), batch_part(second, rest))
