"""nnUNetTrainerIDEAL: Basak et al., "IDEAL: Improved DEnse LocAL contrastive learning for
semi-supervised medical image segmentation", ICASSP 2023 (docs/methods.md, its section).

One nnU-Net run in two stages (settings in ``nnunet_contrast.ideal`` of the plans):
1. ``dense``: the encoder, nnU-Net's decoder and a 1x1-conv projection head learn the dense InfoNCE
   ``L_loc`` on two intensity-only views of labelled and unlabelled images (labels unused): each
   position of the query view against the same position of the key view (no gradient through
   the key path), the key view's other positions as negatives; Adam.
2. ``finetune``: the network is ``DualDecoderUNet`` (nnU-Net's transposed-conv decoder and a
   bilinear one, trilinear in 3D, on the shared encoder, both with deep supervision), trained with nnU-Net's SGD and
   poly schedule on ``L_SSF``: nnU-Net's loss of each decoder on the labelled batch, plus
   ``lambda_cps`` x cross pseudo-supervision on the unlabelled batch (each decoder learns the other's
   argmax). Inference (``nnUNetv2_predict``) sees one output: the mean of both decoders' softmax.
"""
import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_contrast.data.pixel_selection import sample_positions
from nnunet_contrast.losses import CrossPseudoSupervisionLoss, DenseInfoNCELoss
from nnunet_contrast.network.dual_decoder import DualDecoderUNet
from nnunet_contrast.network.heads import DenseProjectionHead
from nnunet_contrast.network.taps import (check_unet, decoder_block_features, decoder_block_parameters,
                                          decoder_channels, decoder_stage_count, unwrap_network)
from nnunet_contrast.training.method import FINETUNE, MethodTrainer
from nnunet_contrast.training.schedule import (ENCODER, NETWORK, SEGMENTATION, Adam, Data, Head, NnUNetSGD,
                                               Part, Stage, Term, Views, ramped)
from nnunet_contrast.training.self_training import SELF_TRAINING_VARIANT
from nnunet_contrast.training.step import JointPass, StepInputs, batch_part

DECODER = Part("decoder")  # nnU-Net's decoder without its segmentation layers


class nnUNetTrainerIDEAL(MethodTrainer):
    presets = ("base", "ideal_basak2023")
    method_key = "ideal"
    head_names = ("dense",)
    own_parts = (DECODER,)
    requires_unlabeled = True

    def build_schedule(self):
        s, budget = self.method_settings, self.settings.budget
        return [
            Stage("dense", s.pretrain_epochs, self.pretrain_iterations(s.pretrain_iterations_per_epoch),
                  (ENCODER, DECODER, Head("dense")), Adam(s.pretrain_lr, s.pretrain_weight_decay),
                  (Term("dense_contrast"),), Data.LABELED_AND_UNLABELED, Views.INTENSITY),
            Stage(FINETUNE, budget.num_epochs, budget.num_iterations_per_epoch, (NETWORK,), NnUNetSGD(),
                  (Term(SEGMENTATION), Term("cross_pseudo_supervision", ramped(s.lambda_cps, s.cps_rampup_fraction))),
                  Data.LABELED_AND_UNLABELED),
        ]

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
        self.dense_loss = DenseInfoNCELoss(self.method_settings.temperature)
        weights = getattr(self.loss, "weight_factors", None)  # nnU-Net's deep-supervision weights
        cps = CrossPseudoSupervisionLoss()
        self.cps_loss = DeepSupervisionWrapper(cps, weights) if weights is not None else cps

    def build_heads(self) -> nn.ModuleDict:
        s = self.method_settings
        return nn.ModuleDict({"dense": DenseProjectionHead(decoder_channels(self.network), s.head_hidden,
                                                           s.embedding_dim, dims=self.patch_dims)})

    def parameters_of(self, part: Part):
        if part == DECODER:
            return decoder_block_parameters(self.network, decoder_stage_count(self.network))
        return super().parameters_of(part)

    # ------------------------------------------------------------ pretraining
    def dense_contrast_loss(self, inputs: StepInputs) -> torch.Tensor:
        """``L_loc`` on two intensity-only views (positions stay aligned) of labelled and unlabelled images."""
        query_view, key_view = inputs.views(inputs.images)
        queries = self.dense_embeddings(query_view)
        with torch.no_grad():  # the key path has stop-gradient
            keys = self.dense_embeddings(key_view)
        positions = sample_positions(queries.shape[1], self.method_settings.sampled_positions, queries.device)
        return self.dense_loss(queries[:, positions], keys[:, positions])

    def dense_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, positions, D): the head on the last stage of nnU-Net's decoder, one vector per pixel (voxel)."""
        features = decoder_block_features(self.network, images, decoder_stage_count(self.network))
        return self.heads["dense"](features).flatten(2).transpose(1, 2)

    # ------------------------------------------------------------ fine-tuning
    def joint_forward(self, images: torch.Tensor, features: bool) -> JointPass:
        """Both decoders over labelled and unlabelled images (nnU-Net's loss applies to each), through the network
        as nnU-Net holds it: compiled on CUDA."""
        plain = unwrap_network(self.network)
        plain.both_outputs = True
        try:
            first, second = self.network(images)
        finally:
            plain.both_outputs = False
        return JointPass([first, second], None)

    def cross_pseudo_supervision_loss(self, inputs: StepInputs) -> torch.Tensor:
        """Each decoder learns the other's argmax on the unlabelled images (0 without an unlabelled batch)."""
        if inputs.unlabeled is None:
            return inputs.images.new_zeros(())
        first, second = inputs.joint.outputs
        unlabeled = inputs.trained.unlabeled_part
        return self.cps_loss(batch_part(first, unlabeled), batch_part(second, unlabeled))


class nnUNetTrainerIDEALSelfTraining(nnUNetTrainerIDEAL):
    """The method's joint training with the self-training term added (EMA teacher's pseudo-labels)."""
    variant_settings = SELF_TRAINING_VARIANT
