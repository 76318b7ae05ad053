"""SC-SAM's SAM at prediction time: nnU-Net's predictor runs :class:`SpecialistPromptedSAMNetwork`, which prompts the
fine-tuned SAM with the trained nnU-Net of the same checkpoint, as in training and as the paper evaluates it
(``nnunet-foundation predict-sam-student``; :mod:`nnunet_foundation.foundation.cotrained_sam` loads it)."""
from __future__ import annotations

import torch
from torch import nn

from nnunet_foundation.methods.scsam.prompting import add_prompt_tokens, prompted_patch_logits

#: points are drawn at random inside/outside nnU-Net's regions; a fixed seed makes a prediction repeatable
PREDICTION_SEED = 0


class SpecialistPromptedSAMNetwork(nn.Module):
    """``(B, C, [D,] H, W)`` patches -> SAM's ``(B, K, [D,] H, W)`` logits, prompted by nnU-Net's argmax of the same
    patch. ``load_state_dict`` takes one fold's ``{"sam": adapted SAM tensors, "specialist": nnU-Net weights}``."""

    def __init__(self, generalist, specialist: nn.Module, num_classes: int, num_points: int):
        super().__init__()
        self.generalist, self.specialist = generalist, specialist
        self.num_classes, self.num_points = int(num_classes), int(num_points)
        self.generator = torch.Generator().manual_seed(PREDICTION_SEED)

    @classmethod
    def from_checkpoint(cls, sam_config: dict, ssl_state: dict, plans_manager, configuration_manager,
                        dataset_json: dict) -> "SpecialistPromptedSAMNetwork":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        from nnunet_foundation.foundation.config import build_generalist
        from nnunet_foundation.methods.scsam.trainer import PROMPTING_KEY

        p = ssl_state[PROMPTING_KEY]
        generalist = add_prompt_tokens(build_generalist(sam_config), p["num_classes"], p["num_tokens"], p["channels"])
        # this package's trainers keep nnU-Net's architecture: its builder makes the network network_weights fits
        specialist = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
        return cls(generalist, specialist, p["num_classes"], p["num_points"])

    @staticmethod
    def fold_parameters(checkpoint: dict, sam_key: str) -> dict:
        return {"sam": dict(checkpoint["ssl_state"][sam_key]), "specialist": checkpoint["network_weights"]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        specialist_argmax = self.specialist(x).argmax(1)
        return prompted_patch_logits(self.generalist, x, specialist_argmax, self.num_classes, self.num_points,
                                     self.generator)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # nnUNetPredictor calls this with each fold's parameters before predicting with that fold; the frozen SAM
        # backbone is the same for every fold and stays loaded once (loading is always strict)
        from nnunet_foundation.foundation.lora import load_adaptable_state_dict

        load_adaptable_state_dict(self.generalist, state_dict["sam"])
        self.specialist.load_state_dict(state_dict["specialist"])
