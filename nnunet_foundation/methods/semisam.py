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
import torch.nn.functional as F

from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_foundation.methods.mixed_domain import nnUNetTrainerMixedDomain
from nnunet_foundation.methods.ua_mt import nnUNetTrainerUAMT
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import over_scales, soft_cross_entropy, softmax_mse

PROMPT_MODES = ("mask", "point", "unc")
PROMPT_SOURCES = ("teacher", "student")
SAM_LOSSES = ("mse", "ce")


class SemiSAMError(ValueError):
    """SemiSAM settings that cannot work; the message says how to fix them."""


def sam_schedule(progress: float, weight: float, decay: float) -> float:
    """w_sam(t) = weight * exp(-decay * (t/T)^2): full weight at the start, exp(-decay) of it at the end."""
    return weight * math.exp(-decay * progress ** 2)


class SAMGuidance:
    """The SemiSAM term as a mixin over a Mean-Teacher-style trainer (an EMA teacher, and ``unsupervised_loss`` or
    another place that calls :meth:`sam_guidance_term`): ``class X(SAMGuidance, nnUNetTrainerMeanTeacher)``."""

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
        # name (or folder) of an offline pseudo-label cache (nnunet-foundation pseudo-label): the generalist's
        # labels are read with the unlabeled crops instead of running the generalist every iteration
        "pseudo_labels": "",
    }
    sam_log_keys = ("sam_loss", "sam_weight", "generalist_seconds", "generalist_agreement", "generalist_coverage")

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
        from nnunet_foundation.foundation.config import GeneralistConfigError, backend_spec, resolve_generalists

        s = self.ssl_settings
        for name, allowed in (("prompt_mode", PROMPT_MODES), ("prompt_source", PROMPT_SOURCES),
                              ("sam_loss", SAM_LOSSES), ("generalist_combination", ("mean", "agreement"))):
            if s[name] not in allowed:
                raise SemiSAMError(f"{type(self).__name__}: setting '{name}' must be one of {allowed}, got "
                                   f"{s[name]!r}.")
        if s["pseudo_labels"]:
            return []  # the cache's manifest records the generalist that made it
        mode = s["prompt_mode"]
        spacing = self.configuration_manager.spacing if len(self.configuration_manager.patch_size) == 3 else None
        try:
            configs = resolve_generalists(s["generalists"], type(self).__name__, self.implied_prompt_settings(),
                                          spacing)
        except GeneralistConfigError as e:
            raise SemiSAMError(str(e)) from None
        for c in configs:
            if mode != "mask" and backend_spec(c["backend"]).box_prompts_only:
                raise SemiSAMError(f"{type(self).__name__}: prompt_mode '{mode}' prompts with points, and the "
                                   f"{c['backend']} generalist was trained with boxes only (points alone gave it a "
                                   f"Dice of 0 on the test object of tests/test_litemedsam.py). Use prompt_mode 'mask' (boxes), or a "
                                   f"sam/sam2 generalist for point prompts.")
        if mode != "mask" and len({c["axis"] for c in configs}) > 1:
            raise SemiSAMError("point/unc prompts are shared by all generalists: give them the same 'axis'")
        return configs

    def implied_prompt_settings(self) -> dict:
        """What the prompt mode implies for the generalists, for keys the user left out."""
        implied = {"mask": dict(use_mask_prompt=True, use_box=True, num_points=0),
                   "point": dict(use_mask_prompt=False, use_box=False, num_points=1),
                   "unc": dict(use_mask_prompt=False, use_box=False, num_points=1,
                               point_selection="uncertainty")}[self.ssl_settings["prompt_mode"]]
        # pseudo-labels for a softmax network: the K maps must sum to one
        implied["background"] = "renormalize"
        # a natural RGB image is shown to the generalist in colour (LiteMedSAM's encoder was trained on colour)
        from nnunet_foundation.foundation.config import colour_defaults

        implied.update(colour_defaults(self.dataset_json))
        return implied

    def offline_pseudo_labels(self, unlabeled_cases):
        if not self.ssl_settings["pseudo_labels"]:
            return None
        reader = self.open_pseudo_label_cache(unlabeled_cases)
        self.print_to_log_file(f"SemiSAM pseudo-labels from the offline cache {reader.folder} (no generalist is run "
                               f"during training)")
        return reader

    def build_ssl_modules(self):
        super().build_ssl_modules()
        if self.ssl_settings["pseudo_labels"]:
            return
        from nnunet_foundation.foundation.config import build_generalist, describe_generalist
        from nnunet_foundation.foundation.generalist import GeneralistEnsemble

        members = [build_generalist(c) for c in self.generalist_configs]
        generalist = members[0] if len(members) == 1 else \
            GeneralistEnsemble(members, self.ssl_settings["generalist_combination"])
        self.generalist = generalist.to(self.device)
        self.generalist.eval()
        names = ", ".join(describe_generalist(c) for c in self.generalist_configs)
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
        from nnunet_foundation.foundation.generalist import segment_with_clicks

        self.generalist.eval()
        if self.ssl_settings["prompt_mode"] == "mask":
            return self.generalist(x, probs)
        return segment_with_clicks(self.generalist_members(), x, probs, self.ssl_settings["sam_clicks"],
                                   self.ssl_settings["generalist_combination"])

    def sam_consistency(self, student_out_u, pseudo: torch.Tensor, voxel_weight: Optional[torch.Tensor]):
        scales = self.deep_supervision_weights() if self.ssl_settings["sam_all_scales"] else (1.0,)
        loss = soft_cross_entropy if self.ssl_settings["sam_loss"] == "ce" else softmax_mse
        return over_scales(loss, scales, student_out_u, pseudo, voxel_weight)

    def unsupervised_loss(self, student_out_u, unlabeled):
        self._teacher_probs = None
        loss, logs = super().unsupervised_loss(student_out_u, unlabeled)
        term, sam_logs = self.sam_guidance_term(student_out_u, unlabeled)
        logs.update(sam_logs)
        return loss + term, logs

    def sam_guidance_term(self, student_out_u, unlabeled):
        """The weighted SAM term on the student's output for the clean unlabeled crop, and its log values; the
        teacher's probabilities come from this iteration's teacher pass when the base trainer made one."""
        weight = self.sam_weight()
        logs = {"sam_weight": weight}
        if weight < 1e-8:  # late in training the term is gone: skip the generalist's cost
            logs.update({"sam_loss": 0.0, "generalist_seconds": 0.0, "generalist_agreement": math.nan,
                         "generalist_coverage": math.nan})
            return student_out_u[0].sum() * 0.0, logs
        if self.ssl_settings["prompt_source"] == "teacher":
            probs = self._teacher_probs if self._teacher_probs is not None else \
                torch.softmax(self.teacher_predict(unlabeled["data"])[0].float(), 1)
        else:
            probs = torch.softmax(student_out_u[0].detach().float(), 1)
        if "pseudo_label" in unlabeled:
            term, term_logs = self.cached_pseudo_label_term(student_out_u, unlabeled["pseudo_label"], probs)
            logs.update(term_logs)
            return weight * term, logs
        x = unlabeled["data"]
        out = self.generalist_pseudo_label(x.float(), probs)
        pseudo = out.probabilities.detach().to(probs.dtype)
        # only where the generalist segmented something: a slice (or image) without any prompt comes back as
        # "background" because nothing was asked, and teaching that would erase what the specialist has not found yet
        voxel_weight = out.covered.to(probs.dtype) if out.covered is not None else None
        if self.ssl_settings["prompt_mode"] == "unc":
            agreement_weight = 1.0 - (pseudo - probs).abs().mean(1, keepdim=True)
            voxel_weight = agreement_weight if voxel_weight is None else voxel_weight * agreement_weight
        term = self.sam_consistency(student_out_u, pseudo, voxel_weight)
        with torch.no_grad():
            agreement = (pseudo.argmax(1) == probs.argmax(1)).float().mean()
        logs.update({"sam_loss": term.detach(), "generalist_seconds": out.seconds,
                     "generalist_agreement": agreement,
                     "generalist_coverage": 1.0 if out.covered is None else float(out.covered.float().mean())})
        return weight * term, logs

    def cached_pseudo_label_term(self, student_out_u, label: torch.Tensor, probs: torch.Tensor):
        """The (unweighted) SAM term towards an offline pseudo-label ``(B, 1, *patch)`` and its log values: one-hot
        where it says something, no weight where it holds the ignore value (not prompted, not confident, or outside
        the image)."""
        from nnunet_foundation.training.unlabeled_stream import known_pseudo_label

        label, known = known_pseudo_label(label)
        target = F.one_hot(label, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
        term = self.sam_consistency(student_out_u, target, known.unsqueeze(1).to(probs.dtype))
        with torch.no_grad():
            agreement = ((target.argmax(1) == probs.argmax(1)) & known).float().sum() / known.sum().clamp_min(1)
        return term, {"sam_loss": term.detach(), "generalist_seconds": 0.0, "generalist_agreement": agreement,
                      "generalist_coverage": float(known.float().mean())}


class nnUNetTrainerSemiSAM(SAMGuidance, nnUNetTrainerMeanTeacher):
    """SemiSAM(+) on Mean Teacher: ``nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerSemiSAM``."""

    default_settings = {**nnUNetTrainerMeanTeacher.default_settings, **SAMGuidance.sam_default_settings}
    ssl_log_keys = nnUNetTrainerMeanTeacher.ssl_log_keys + SAMGuidance.sam_log_keys


class nnUNetTrainerSemiSAMUAMT(SAMGuidance, nnUNetTrainerUAMT):
    """SemiSAM+ on UA-MT (uncertainty-masked teacher consistency plus the generalist term)."""

    default_settings = {**nnUNetTrainerUAMT.default_settings, **SAMGuidance.sam_default_settings}
    ssl_log_keys = nnUNetTrainerUAMT.ssl_log_keys + SAMGuidance.sam_log_keys


class nnUNetTrainerSemiSAMMixedDomain(SAMGuidance, nnUNetTrainerMixedDomain):
    """The SemiSAM term on the mixed-domain trainer: bidirectional copy-paste with the EMA teacher's pseudo-labels
    and cluster MMD (nnunet_foundation.methods.mixed_domain), plus the student's output on the clean unlabeled crop
    towards the generalist's labels, prompted by the teacher (or read from an offline cache)."""

    default_settings = {**nnUNetTrainerMixedDomain.default_settings, **SAMGuidance.sam_default_settings}
    ssl_log_keys = nnUNetTrainerMixedDomain.ssl_log_keys + SAMGuidance.sam_log_keys

    def compute_losses(self, labeled, unlabeled):
        self._teacher_probs = None  # set again by this iteration's teacher pass (SAMGuidance.teacher_predict)
        return super().compute_losses(labeled, unlabeled)

    def clean_unlabeled_terms(self, student_out_u, unlabeled):
        return self.sam_guidance_term(student_out_u, unlabeled)


__all__ = ["nnUNetTrainerSemiSAM", "nnUNetTrainerSemiSAMUAMT", "nnUNetTrainerSemiSAMMixedDomain",
           *make_budget_variants(nnUNetTrainerSemiSAM, globals()),
           *make_budget_variants(nnUNetTrainerSemiSAMUAMT, globals()),
           *make_budget_variants(nnUNetTrainerSemiSAMMixedDomain, globals())]
