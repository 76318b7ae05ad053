"""A multi-modal nnU-Net architecture: one encoder per input modality with channel attention, fused per stage by
learned gates, decoded by nnU-Net's own U-Net decoder.

Source: a paper abstract (BraTS 2019 HGG, 1/5/10% labeled): a Modality-specific Enhancing Module (MEM) strengthens
each modality's features by channel-wise attention; a Complementary Information Fusion (CIF) exchanges information
between modalities; unlabeled data train through cross-modal consistency. No code is published; the concrete design
is ours:

* one ``PlainConvEncoder`` per input channel (nnU-Net's plain encoder, the plans' stages, kernels and strides), each
  ``modality_width`` (0.5) times the plans' features per stage, so four modalities cost about twice one plain encoder;
* MEM: squeeze-and-excitation (global average pool, two 1x1 convolutions with reduction ``se_reduction``, sigmoid) on
  every stage's features of every modality;
* CIF, per stage: per-voxel gates over modalities (a 1x1 convolution of all modalities' features -> one logit per
  modality, softmax over modalities) weight each modality's features, projected (1x1) to the plans' width; the sum is
  the fused skip feature the decoder reads. Where a modality carries the boundary, its gate can take over there;
* nnU-Net's ``UNetDecoder`` on the fused features; ``forward`` returns its output, so training, deep supervision,
  ``nnUNetv2_predict`` and every trainer see an ordinary nnU-Net network. ``forward`` also decodes each
  modality's projected features alone with the same decoder when called with ``streams=True`` (the
  per-modality predictions the cross-modal consistency compares with the fused one).

Use it through the plans (``network_class_name``): ``nnunet-foundation multimodal-plans -d D`` writes a plans copy
``nnUNetPlansMultiModal`` that points at this class and reuses the preprocessed data.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

NETWORK_CLASS_NAME = "nnunet_foundation.methods.multimodal.network.MultiModalUNet"


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al., CVPR 2018) for 2D or 3D features: x * sigmoid(W2 relu(W1 avgpool(x)))."""

    def __init__(self, channels: int, conv_op: Type[_ConvNd], reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.squeeze = conv_op(channels, hidden, 1)
        self.excite = conv_op(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(pooled))))


class GatedFusion(nn.Module):
    """Per-voxel softmax gates over modalities, each modality projected to the fused width, weighted and summed."""

    def __init__(self, num_modalities: int, modality_channels: int, fused_channels: int, conv_op: Type[_ConvNd]):
        super().__init__()
        self.gate = conv_op(num_modalities * modality_channels, num_modalities, 1)
        self.project = nn.ModuleList(conv_op(modality_channels, fused_channels, 1) for _ in range(num_modalities))

    def forward(self, features: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        gates = torch.softmax(self.gate(torch.cat(features, 1)), 1)
        projected = [p(f) for p, f in zip(self.project, features)]
        fused = sum(gates[:, m:m + 1] * projected[m] for m in range(len(projected)))
        return fused, projected


class MultiModalUNet(nn.Module):
    """Same constructor arguments as nnU-Net's ``PlainConvUNet`` (so the plans' ``arch_kwargs`` build it), plus
    ``modality_width`` and ``se_reduction``."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Union[int, List[int], Tuple[int, ...]],
                 conv_op: Type[_ConvNd], kernel_sizes, strides, n_conv_per_stage, num_classes: int,
                 n_conv_per_stage_decoder, conv_bias: bool = False, norm_op: Union[None, Type[nn.Module]] = None,
                 norm_op_kwargs: dict = None, dropout_op: Union[None, Type[_DropoutNd]] = None,
                 dropout_op_kwargs: dict = None, nonlin: Union[None, Type[nn.Module]] = None,
                 nonlin_kwargs: dict = None, deep_supervision: bool = False, nonlin_first: bool = False,
                 modality_width: float = 0.5, se_reduction: int = 4):
        super().__init__()
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        modality_features = [max(4, int(round(f * modality_width))) for f in features_per_stage]
        self.num_modalities = input_channels
        self.encoders = nn.ModuleList(
            PlainConvEncoder(1, n_stages, modality_features, conv_op, kernel_sizes, strides, n_conv_per_stage,
                             conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
                             return_skips=True, nonlin_first=nonlin_first)
            for _ in range(input_channels))
        self.enhance = nn.ModuleList(
            nn.ModuleList(SqueezeExcitation(c, conv_op, se_reduction) for c in modality_features)
            for _ in range(input_channels))
        self.fuse = nn.ModuleList(GatedFusion(input_channels, m, f, conv_op)
                                  for m, f in zip(modality_features, features_per_stage))
        reference = self.encoders[0]
        # the decoder reads the encoder's layout; a plain record of it keeps the decoder from registering (and
        # checkpointing) a second copy of an encoder's weights
        layout = SimpleNamespace(output_channels=list(features_per_stage), strides=reference.strides,
                                 kernel_sizes=reference.kernel_sizes, conv_op=conv_op, conv_bias=conv_bias,
                                 norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                                 dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.decoder = UNetDecoder(layout, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first)

    @staticmethod
    def initialize(module):
        """nnU-Net's initialisation for its own networks (He, negative slope 1e-2); get_network_from_plans applies it."""
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        InitWeights_He(1e-2)(module)

    def encode(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]]]:
        """(fused skip features per stage, per modality its projected skip features per stage)."""
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"MultiModalUNet was built for {self.num_modalities} input channel(s), got {x.shape[1]}")
        per_modality = []
        for m, (encoder, enhance) in enumerate(zip(self.encoders, self.enhance)):
            per_modality.append([se(f) for se, f in zip(enhance, encoder(x[:, m:m + 1]))])
        fused, projected = [], [[] for _ in range(self.num_modalities)]
        for stage, fusion in enumerate(self.fuse):
            f, p = fusion([features[stage] for features in per_modality])
            fused.append(f)
            for m in range(self.num_modalities):
                projected[m].append(p[m])
        return fused, projected

    def forward(self, x: torch.Tensor, streams: bool = False):
        """The fused prediction; with ``streams=True`` also one prediction per modality, decoded with the same decoder
        from that modality's features alone (a keyword, so it passes through DDP and torch.compile wrappers)."""
        fused, projected = self.encode(x)
        if not streams:
            return self.decoder(fused)
        return self.decoder(fused), [self.decoder(p) for p in projected]

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's planner asks networks for their feature-map size to fit the GPU; an upper bound here: the
        plain U-Net's at the plans' width for the fusion and decoder plus each modality encoder's."""
        total = self.decoder.compute_conv_feature_map_size(input_size)
        for encoder in self.encoders:
            total += encoder.compute_conv_feature_map_size(input_size)
        return total


def multimodal_plans(plans: dict, plans_name: str) -> dict:
    """A copy of nnU-Net plans whose configurations build :class:`MultiModalUNet` (same data identifiers, so the
    preprocessed data are reused). Only plain-U-Net configurations can be switched: the residual encoder's
    ``arch_kwargs`` describe other blocks."""
    import copy

    new = copy.deepcopy(plans)
    new["plans_name"] = plans_name
    for name, configuration in new["configurations"].items():
        architecture = configuration.get("architecture")
        if architecture is None:
            continue  # inherits its architecture from another configuration
        if not architecture["network_class_name"].endswith("PlainConvUNet"):
            raise ValueError(f"configuration {name!r} uses {architecture['network_class_name']}; the multi-modal "
                             f"network replaces nnU-Net's plain U-Net (default plans, nnUNetPlans) only")
        architecture["network_class_name"] = NETWORK_CLASS_NAME
    return new
