"""The benchmark's bounds: budget variants of the stock ``nnUNetTrainer`` (labeled-only lower bound and fully
supervised upper bound), and ``nnUNetTrainerEMA``, the same training exporting an EMA of its weights.

nnU-Net already ships ``nnUNetTrainer_5epochs`` and friends; only this package's extra budgets are added for it.

Why the EMA variant: Mean Teacher, UA-MT and SemiSAM export their EMA teacher, a temporal ensemble of the student
that is smoother than the last weights, especially after short budgets. Against a baseline that exports its last
weights, part of their gain would be the averaging and not the unlabeled data. ``nnUNetTrainerEMA`` keeps the same EMA
(``ema_decay``, 0.99 by default as Mean Teacher's, with Mean Teacher's warm-up), updated after every optimiser step,
and writes it as ``network_weights`` (what ``nnUNetv2_predict`` and nnU-Net's final validation use); the trained
weights and the step count are kept in the checkpoint for an exact ``--c``.
"""
from __future__ import annotations

import contextlib

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.checkpoint_files import (EMA_STATE_KEY, read_checkpoint_for_resume,
                                                          save_checkpoint_atomically)
from nnunet_foundation.training.networks import EMATeacher, load_state_dict_flexible, unwrap_network
from nnunet_foundation.training.settings import SettingsError, record_or_check_settings, resolve_settings


class nnUNetTrainerEMA(nnUNetTrainer):
    """nnU-Net's training unchanged, exporting an exponential moving average of its weights (see the module)."""

    default_settings = {"ema_decay": 0.99}
    exported_model = "EMA of the weights"

    # nnU-Net records its caller's arguments by name, so the signature stays exactly nnU-Net's
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        not_used = {}  # settings of the semi-supervised trainers in the same shell or config file
        self.ssl_settings = resolve_settings(self.default_settings, [c.__name__ for c in type(self).__mro__],
                                             not_used=not_used)
        self.ema = None
        self.ema_steps = 0  # optimiser steps averaged so far, across resumptions (the warm-up depends on it)
        self._ema_restored = False

    def initialize(self):
        super().initialize()
        self.ema = EMATeacher(self.network, self.ssl_settings["ema_decay"])

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if not self._ema_restored:  # after -pretrained_weights, which nnU-Net loads after initialize()
            self.ema.copy_student()
        super().on_train_start()
        # recorded like the semi-supervised trainers' (after a successful start, so a failed one keeps the folder's
        # record): ema_decay is read from the same nnUNet_ssl_ema_decay as Mean Teacher's, so a shell set up for
        # Mean Teacher changes the bounds too, and the benchmark report must be able to say so
        if self.local_rank == 0:
            record_or_check_settings(self.output_folder, self.ssl_settings, type(self).__name__,
                                     resuming=self._ema_restored)
        self.print_to_log_file(f"Exporting the EMA of the weights (ema_decay {self.ssl_settings['ema_decay']}) as "
                               f"network_weights")

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self.ema.update(self.ema_steps)
        self.ema_steps += 1
        return out

    # ------------------------------------------------------------------------ validation on the exported model
    @contextlib.contextmanager
    def _ema_in_place(self):
        trained, self.network = self.network, self.ema.module
        try:
            yield
        finally:
            self.network = trained

    def set_deep_supervision_enabled(self, enabled: bool):
        # the EMA module is a plain network even under DDP/compile (nnU-Net's version would look for .module)
        unwrap_network(self.network).decoder.deep_supervision = enabled

    def validation_step(self, batch: dict) -> dict:
        with self._ema_in_place():
            self.network.eval()
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self._ema_in_place():
            super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.ema.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            EMA_STATE_KEY: {"student_weights": unwrap_network(self.network).state_dict(),
                            "steps": self.ema_steps, "settings": self.ssl_settings},
        }
        save_checkpoint_atomically(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # written out rather than delegated: nnU-Net 2.8's load_checkpoint fails on a checkpoint dict, and the
        # trained network must get the trained weights, not network_weights (the EMA)
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            checkpoint, source = read_checkpoint_for_resume(filename_or_checkpoint, self.device, allow_fallback=False,
                                                            log=self.print_to_log_file)
        else:
            checkpoint, source = filename_or_checkpoint, "<checkpoint dict>"
        state = checkpoint.get(EMA_STATE_KEY)
        if state is None:
            raise RuntimeError(f"{source} has no EMA state: it was not written by {type(self).__name__}. To start "
                               f"from its weights use -pretrained_weights instead of --c.")
        if state["settings"] != self.ssl_settings:
            raise SettingsError(f"Refusing to resume from {source}: EMA settings changed (recorded "
                                f"{state['settings']}, now {self.ssl_settings}). Restore them or start a new run.")
        load_state_dict_flexible(self.network, state["student_weights"])
        load_state_dict_flexible(self.ema.module, checkpoint["network_weights"])
        self.ema_steps = int(state["steps"])
        self._ema_restored = True
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

__all__ = ["nnUNetTrainerEMA", *make_budget_variants(nnUNetTrainer, globals(), skip_existing_nnunet_names=True),
           *make_budget_variants(nnUNetTrainerEMA, globals())]
