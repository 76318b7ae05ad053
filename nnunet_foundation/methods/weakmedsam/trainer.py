"""``nnUNetTrainerWeakMedSAM``: nnU-Net on a WeakMedSAM pseudo-mask dataset with a class-weighted cross-entropy.

Pseudo-masks made from blurred, thresholded CAMs tend to spill over the object border; the reference trains its
segmentation network with cross-entropy weighted background 10 : foreground 1, so that the network grows objects
only where the pseudo-masks agree strongly. Settings (``nnUNet_ssl_<name>`` or the ``nnUNet_ssl_config`` file):

``ce_background_weight`` (10.0)
    cross-entropy weight of the background class; every foreground class weighs 1.
``dice_weight`` (0.0)
    weight of nnU-Net's soft Dice term beside the cross-entropy: 0 is the reference's cross-entropy alone, 1 is
    nnU-Net's default Dice + CE (with the weighted CE).

Everything else is the stock ``nnUNetTrainer`` (training, deep supervision, validation, export, ``nnUNetv2_predict``).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.settings import SettingsError, record_or_check_settings, resolve_settings


class nnUNetTrainerWeakMedSAM(nnUNetTrainer):
    """The stock trainer with a class-weighted cross-entropy (see the module docstring)."""

    default_settings = {"ce_background_weight": 10.0, "dice_weight": 0.0}

    # nnU-Net records its caller's arguments by name, so the signature stays exactly nnU-Net's
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.resuming = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        not_used = {}
        self.ssl_settings = resolve_settings(self.default_settings, [c.__name__ for c in type(self).__mro__],
                                             not_used=not_used)
        for name, where in sorted(not_used.items()):
            self.print_to_log_file(f"Setting '{name}' ({where}) belongs to other trainers of this package; not used "
                                   f"by {type(self).__name__}.")
        for name in ("ce_background_weight", "dice_weight"):
            if self.ssl_settings[name] < 0:
                raise SettingsError(f"setting '{name}' of {type(self).__name__} must be >= 0, got "
                                    f"{self.ssl_settings[name]!r}")
        if self.ssl_settings["ce_background_weight"] == 0:
            raise SettingsError("setting 'ce_background_weight' must be > 0 (0 would ignore every background pixel)")

    def class_weights(self) -> torch.Tensor:
        weights = torch.ones(len(self.label_manager.all_labels), dtype=torch.float32)
        weights[0] = float(self.ssl_settings["ce_background_weight"])
        return weights.to(self.device)

    def _build_loss(self):
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} weights classes of a softmax output; region-based training is "
                               f"not supported")
        loss = DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": self.is_ddp}, {"weight": self.class_weights()}, weight_ce=1,
                              weight_dice=float(self.ssl_settings["dice_weight"]),
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
        if self.enable_deep_supervision:  # nnU-Net's own weighting of the deep-supervision outputs
            weights = np.array([1 / (2 ** i) for i in range(len(self._get_deep_supervision_scales()))])
            weights[-1] = 1e-6 if self.is_ddp else 0
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net loads the checkpoint before on_train_start on --c: the recorded settings must then match
        self.resuming = True
        super().load_checkpoint(filename_or_checkpoint)

    def on_train_start(self):
        if self.local_rank == 0:
            record_or_check_settings(self.output_folder, self.ssl_settings, type(self).__name__,
                                     resuming=self.resuming)
        super().on_train_start()
        self.print_to_log_file("WeakMedSAM settings: " + json.dumps(self.ssl_settings, sort_keys=True) +
                               f" (ssl_settings.json in {os.path.basename(self.output_folder)})")


__all__ = ["nnUNetTrainerWeakMedSAM", *make_budget_variants(nnUNetTrainerWeakMedSAM, globals())]
