"""SemiSAM / SemiSAM+ (Zhang et al., BIBM 2024; Zhang, Cheng, Qi, MedIA 2025): Mean Teacher plus pseudo-labels from
frozen promptable foundation models that the network itself prompts.

Per iteration, on top of the Mean Teacher (or UA-MT) loss:

1. the specialist's softmax on the unlabeled patch (the EMA teacher's, or the student's: ``prompt_source``) becomes
   prompts for one or more frozen generalists (``generalists``; see :mod:`nnunet_foundation.foundation`);
   ``prompt_mode``: ``mask`` (default, deterministic) = the specialist's logits as SAM's dense mask prompt plus the
   box of its confident region (SAM needs a sparse prompt to localise an object); ``point`` = iterative clicks,
   the first at the most interior confident pixel, each next one in the largest region where the generalist's
   current mask and the specialist's disagree, labelled by the specialist there (``sam_clicks`` in total);
   ``unc`` = ``point`` with uncertainty-aware click placement, and the SAM term weighted per voxel by the agreement
   between specialist and generalist (1 - mean absolute difference of their class probabilities);
2. several generalists are combined by ``generalist_combination`` (``mean`` or ``agreement``);
3. loss += w_sam(t) * consistency(student softmax, generalist probabilities), with
   w_sam(t) = sam_weight * exp(-sam_decay * (t/T)^2): the generalist guides early and fades as the specialist
   improves, while the Mean Teacher weight 0.1 exp(-5 (1 - t/T)^2) rises.

Two deliberate departures from the released code: the SAM term carries gradient to the student (the released
SemiSAM+ code normalises it to a constant, so it trains nothing), and prompts come only from the specialist's
prediction (the released SemiSAM v1 code builds clicks from the ground truth).

The term is applied at the full-resolution output (``sam_all_scales``: at every deep-supervision scale with the
pseudo-label downsampled and nnU-Net's scale weights). The generalist is loaded once on the training device,
frozen, and not stored in nnU-Net's checkpoints: it is rebuilt from the settings, which a resumed run must keep.
Inference uses the specialist only (the EMA teacher, as for Mean Teacher), with stock ``nnUNetv2_predict``.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_foundation.methods.ua_mt import nnUNetTrainerUAMT
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import over_scales, soft_cross_entropy, softmax_mse

PROMPT_MODES = ("mask", "point", "unc")
PROMPT_SOURCES = ("teacher", "student")
SAM_LOSSES = ("mse", "ce")
CONFIGURE_HINT = (
    "Configure the generalist(s) with the setting 'generalists', e.g.\n"
    "  export nnUNet_ssl_generalists='{\"backend\": \"sam\", \"model_type\": \"vit_b\", "
    "\"checkpoint\": \"/path/to/sam_vit_b_01ec64.pth\"}'\n"
    "(a list of such objects for several generalists, or the path of a JSON file holding them; MedSAM: "
    "\"backend\": \"medsam\"; SAM2: \"backend\": \"sam2\", \"model_type\": \"hiera_t\"). Checkpoints: "
    "setup_scripts/download_checkpoints.sh. See README, 'SAM-guided training'.")


class SemiSAMError(ValueError):
    """SemiSAM settings that cannot work; the message says how to fix them."""


def sam_schedule(progress: float, weight: float, decay: float) -> float:
    """w_sam(t) = weight * exp(-decay * (t/T)^2): full weight at the start, exp(-decay) of it at the end."""
    return weight * math.exp(-decay * progress ** 2)


class SAMGuidance:
    """The SemiSAM term as a mixin over a Mean-Teacher-style trainer (anything with ``unsupervised_loss`` and an EMA
    teacher): ``class X(SAMGuidance, nnUNetTrainerMeanTeacher)``."""

    sam_default_settings = {
        # dict, list of dicts, JSON text or the path of a JSON file (GeneralistConfig keys)
        "generalists": None,
        "generalist_combination": "mean",
        "prompt_source": "teacher",
        "prompt_mode": "mask",
        "sam_clicks": 3,
        "sam_weight": 0.1,
        "sam_decay": 5.0,
        "sam_loss": "mse",
        "sam_all_scales": False,
    }
    sam_log_keys = ("sam_loss", "sam_weight", "generalist_seconds", "generalist_agreement")

    # nnU-Net's __init__ records its caller's arguments by name (locals()[name] for every parameter of
    # type(self).__init__), so a trainer's __init__ must keep exactly nnU-Net's signature: no *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # settings errors surface now, before data loading or any model is built
        self.generalist_configs = self.resolve_generalist_configs()
        self.generalist = None
        self._teacher_probs: Optional[torch.Tensor] = None

    # --------------------------------------------------------------------------------------------- set-up
    def resolve_generalist_configs(self) -> List[dict]:
        from nnunet_foundation.foundation.config import GeneralistConfigError, parse_generalist_setting

        s = self.ssl_settings
        for name, allowed in (("prompt_mode", PROMPT_MODES), ("prompt_source", PROMPT_SOURCES),
                              ("sam_loss", SAM_LOSSES), ("generalist_combination", ("mean", "agreement"))):
            if s[name] not in allowed:
                raise SemiSAMError(f"{type(self).__name__}: setting '{name}' must be one of {allowed}, got "
                                   f"{s[name]!r}.")
        if s["sam_clicks"] < 1:
            raise SemiSAMError(f"{type(self).__name__}: sam_clicks must be >= 1")
        raw = s["generalists"]
        if raw in (None, "", []):
            raise SemiSAMError(f"{type(self).__name__} needs at least one foundation model as generalist, and none "
                               f"is configured.\n{CONFIGURE_HINT}")
        from nnunet_foundation.foundation.config import GeneralistConfig, require_checkpoint_file

        try:
            if isinstance(raw, str):
                raw = parse_generalist_setting(raw)
                raw = [c.to_dict() for c in (raw if isinstance(raw, list) else [raw])]
            user = [dict(c) for c in (raw if isinstance(raw, list) else [raw])]
            configs = [self.complete_generalist_config(c) for c in user]
            checked = [GeneralistConfig.from_dict(c) for c in configs]  # validates every key and value now
        except GeneralistConfigError as e:
            raise SemiSAMError(f"{type(self).__name__}: invalid generalist configuration: {e}\n{CONFIGURE_HINT}") \
                from None
        for c in checked:
            try:
                require_checkpoint_file(c, "generalists")
            except GeneralistConfigError as e:
                raise SemiSAMError(f"{type(self).__name__}: {e}") from None
        if s["prompt_mode"] != "mask" and len({c.axis for c in checked}) > 1:
            raise SemiSAMError("point/unc prompts are shared by all generalists: give them the same 'axis'")
        return configs

    def complete_generalist_config(self, user: dict) -> dict:
        """The user's generalist dict plus what the prompt mode and the plans imply, for keys the user left out."""
        mode = self.ssl_settings["prompt_mode"]
        implied = {"mask": dict(use_mask_prompt=True, use_box=True, num_points=0),
                   "point": dict(use_mask_prompt=False, use_box=False, num_points=1),
                   "unc": dict(use_mask_prompt=False, use_box=False, num_points=1,
                               point_selection="uncertainty")}[mode]
        # pseudo-labels for a softmax network: the K maps must sum to one
        implied["background"] = "renormalize"
        if len(self.configuration_manager.patch_size) == 3:
            implied["spacing"] = [float(x) for x in self.configuration_manager.spacing]
        return {**implied, **user}

    def build_ssl_modules(self):
        super().build_ssl_modules()
        from nnunet_foundation.foundation.config import build_generalist
        from nnunet_foundation.foundation.generalist import GeneralistEnsemble

        members = [build_generalist(c) for c in self.generalist_configs]
        generalist = members[0] if len(members) == 1 else \
            GeneralistEnsemble(members, self.ssl_settings["generalist_combination"])
        self.generalist = generalist.to(self.device)
        self.generalist.eval()
        names = ", ".join(f"{c['backend']} {c.get('model_type') or ''} ({c.get('checkpoint')})".strip()
                          for c in self.generalist_configs)
        self.print_to_log_file(f"SemiSAM generalist(s), frozen: {names}; prompt mode "
                               f"{self.ssl_settings['prompt_mode']} from the {self.ssl_settings['prompt_source']}")

    # ----------------------------------------------------------------------------- teacher probabilities
    def teacher_predict(self, x):
        outputs = super().teacher_predict(x)
        self._teacher_probs = torch.softmax(outputs[0].float(), 1)
        return outputs

    def teacher_passes(self, x):  # UA-MT: the mean over the noisy passes is the better prompt source
        first, mean = super().teacher_passes(x)
        self._teacher_probs = mean[0]
        return first, mean

    # ------------------------------------------------------------------------------------------ the term
    def sam_weight(self) -> float:
        s = self.ssl_settings
        return sam_schedule(self.progress, s["sam_weight"], s["sam_decay"])

    def generalist_members(self):
        return list(getattr(self.generalist, "members", [self.generalist]))

    def generalist_pseudo_label(self, x: torch.Tensor, probs: torch.Tensor):
        """Generalist output for the unlabeled patch, prompted by ``probs`` as ``prompt_mode`` says."""
        from nnunet_foundation.foundation.generalist import combine_outputs
        from nnunet_foundation.foundation.geometry import patch_to_slices
        from nnunet_foundation.foundation.prompts import add_disagreement_clicks, generate_prompts

        self.generalist.eval()
        if self.ssl_settings["prompt_mode"] == "mask":
            return self.generalist(x, probs)
        first = self.generalist_members()[0]
        is_2d = probs.ndim == 4
        axis = 0 if is_2d else first.slice_axis()

        def sliced(t):
            return t.unsqueeze(2) if is_2d else patch_to_slices(t, axis)

        def prompted(prompts):
            outputs = [m(x, probs, prompts) for m in self.generalist_members()]
            return combine_outputs(outputs, self.ssl_settings["generalist_combination"])

        prompts = generate_prompts(sliced(probs), first.config.prompt_settings(), first._generator)
        out = prompted(prompts)
        seconds = out.seconds
        for _ in range(1, self.ssl_settings["sam_clicks"]):
            prompts = add_disagreement_clicks(prompts, sliced(out.probabilities), sliced(probs))
            out = prompted(prompts)
            seconds += out.seconds
        out.seconds = seconds
        return out

    def sam_consistency(self, student_out_u, pseudo: torch.Tensor, voxel_weight: Optional[torch.Tensor]):
        scales = self.deep_supervision_weights() if self.ssl_settings["sam_all_scales"] else (1.0,)
        loss = soft_cross_entropy if self.ssl_settings["sam_loss"] == "ce" else softmax_mse
        return over_scales(loss, scales, student_out_u, pseudo, voxel_weight)

    def unsupervised_loss(self, student_out_u, unlabeled):
        self._teacher_probs = None
        loss, logs = super().unsupervised_loss(student_out_u, unlabeled)
        weight = self.sam_weight()
        logs.update({"sam_weight": weight})
        if weight < 1e-8:  # late in training the term is gone: skip the generalist's cost
            logs.update({"sam_loss": 0.0, "generalist_seconds": 0.0, "generalist_agreement": math.nan})
            return loss, logs
        if self.ssl_settings["prompt_source"] == "teacher":
            probs = self._teacher_probs if self._teacher_probs is not None else \
                torch.softmax(self.teacher_predict(unlabeled["data"])[0].float(), 1)
        else:
            probs = torch.softmax(student_out_u[0].detach().float(), 1)
        x = unlabeled["data"]
        out = self.generalist_pseudo_label(x.float(), probs)
        pseudo = out.probabilities.detach().to(probs.dtype)
        voxel_weight = None
        if self.ssl_settings["prompt_mode"] == "unc":
            voxel_weight = 1.0 - (pseudo - probs).abs().mean(1, keepdim=True)
        term = self.sam_consistency(student_out_u, pseudo, voxel_weight)
        with torch.no_grad():
            agreement = (pseudo.argmax(1) == probs.argmax(1)).float().mean()
        logs.update({"sam_loss": term.detach(), "generalist_seconds": out.seconds,
                     "generalist_agreement": agreement})
        return loss + weight * term, logs


class nnUNetTrainerSemiSAM(SAMGuidance, nnUNetTrainerMeanTeacher):
    """SemiSAM(+) on Mean Teacher: ``nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerSemiSAM``."""

    default_settings = {**nnUNetTrainerMeanTeacher.default_settings, **SAMGuidance.sam_default_settings}
    ssl_log_keys = nnUNetTrainerMeanTeacher.ssl_log_keys + SAMGuidance.sam_log_keys


class nnUNetTrainerSemiSAMUAMT(SAMGuidance, nnUNetTrainerUAMT):
    """SemiSAM+ on UA-MT (uncertainty-masked teacher consistency plus the generalist term)."""

    default_settings = {**nnUNetTrainerUAMT.default_settings, **SAMGuidance.sam_default_settings}
    ssl_log_keys = nnUNetTrainerUAMT.ssl_log_keys + SAMGuidance.sam_log_keys


__all__ = ["nnUNetTrainerSemiSAM", "nnUNetTrainerSemiSAMUAMT",
           *make_budget_variants(nnUNetTrainerSemiSAM, globals()),
           *make_budget_variants(nnUNetTrainerSemiSAMUAMT, globals())]
