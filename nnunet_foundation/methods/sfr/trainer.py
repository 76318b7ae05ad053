"""SFR stage 3, re-training: ``nnUNetTrainerSFR`` = Mean Teacher + the frozen fine-tuned generalist's hard
pseudo-labels on the unlabeled patches.

Per iteration, on top of Mean Teacher (nnU-Net's loss on labeled patches, EMA-teacher consistency weighted
``0.1 exp(-5 (1 - t/T)^2)``): the unlabeled patch is stitched into mosaics, the generalist fine-tuned by
``nnunet-foundation sfr`` segments it prompt-free, the mosaics are un-stitched and the argmax is a hard pseudo-label
towards which the student learns ``sfr_weight x 0.5 (CE + Dice)`` (weight 1, no ramp-up, as the reference), at every
deep-supervision scale with nnU-Net's scale weights. With ``pseudo_labels`` the labels come from an offline cache that
``nnunet-foundation sfr --pseudo-labels`` wrote with the same generalist (one generalist pass per case instead of per
iteration: the CPU path); voxels the cache marks unknown carry no weight.

The trainer refuses to start without a finished fine-tuning (the message names the command that makes it) and
refuses ``--c`` when the fine-tuned generalist changed since the run started. The generalist is never stored in
nnU-Net's checkpoints; inference is nnU-Net alone (the EMA teacher, as Mean Teacher), with stock
``nnUNetv2_predict``.
"""
from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

import torch

from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_foundation.methods.sfr.fine_tune import (FINAL_FILE, SFRError, build_sfr_generalist, generalist_folder,
                                                     load_final, read_manifest, slice_axis)
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice, over_scales

#: ssl_state key: SHA-256 of the fine-tuned generalist the run learns from (a resumed run must use the same)
GENERALIST_DIGEST_KEY = "sfr_generalist_sha256"


def half_ce_dice(logits, labels, mask=None):
    """SFR's segmentation loss, 0.5 (CE + Dice), restricted to ``mask``."""
    return 0.5 * ce_dice(logits, labels, mask)


class nnUNetTrainerSFR(nnUNetTrainerMeanTeacher):
    """SFR re-training (see the module docstring): ``nnUNetv2_train D C F -tr nnUNetTrainerSFR`` after
    ``nnunet-foundation sfr -d D -c C -f F``."""

    default_settings = {
        **nnUNetTrainerMeanTeacher.default_settings,
        "sfr_weight": 1.0,
        # folder of the fine-tuned generalist; empty = where nnunet-foundation sfr writes it for this run
        "sfr_generalist": "",
        # name (or folder) of an offline pseudo-label cache (nnunet-foundation sfr --pseudo-labels); empty = online
        "pseudo_labels": "",
    }
    ssl_log_keys = nnUNetTrainerMeanTeacher.ssl_log_keys + ("sfr_loss", "sfr_weight", "generalist_seconds",
                                                            "pseudo_coverage")

    @classmethod
    def benchmark_prestage(cls, dataset: str, configuration: str, plans: str, fold: int, device: str,
                           generalist: Optional[str], options: List[str], cached: bool,
                           budget: Optional[str] = None) -> Tuple[List[str], Optional[str]]:
        """What the benchmark runs once per fold before training this trainer: ``nnunet-foundation sfr`` (the
        fine-tuning on the fold's labeled cases, skipped when finished), and for a cached run also its pseudo-labels
        of the fold's unlabeled cases. Returns the command and the cache the training reads (None: online)."""
        cmd = ["nnunet-foundation", "sfr", "-d", dataset, "-c", configuration, "-p", plans, "-f", str(fold),
               "-device", device, *(["--generalists", generalist] if generalist is not None else []), *options]
        return (cmd + ["--pseudo-labels"], f"SFR__{plans}__fold{fold}") if cached else (cmd, None)

    # nnU-Net's __init__ records its caller's arguments by name (locals()[name] for every parameter of
    # type(self).__init__), so a trainer's __init__ must keep exactly nnU-Net's signature: no *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.ssl_settings["sfr_weight"] < 0:
            raise SFRError(f"{type(self).__name__}: sfr_weight must be >= 0, got {self.ssl_settings['sfr_weight']}")
        # before data loading: no fine-tuned generalist, no run
        self.sfr_folder, self.sfr_manifest = self._finished_generalist()
        self.generalist = None

    def _finished_generalist(self):
        from nnunet_foundation.unlabeled import plans_fingerprint

        folder = self.ssl_settings["sfr_generalist"] or generalist_folder(
            os.path.dirname(self.output_folder_base), self.plans_manager.plans_name, self.configuration_name,
            self.fold)
        manifest = read_manifest(folder)
        command = (f"nnunet-foundation sfr -d {self.plans_manager.dataset_name} -c {self.configuration_name} "
                   f"-f {self.fold} -p {self.plans_manager.plans_name}")
        if manifest is None or not manifest.get("finished") or not os.path.isfile(os.path.join(folder, FINAL_FILE)):
            state = "is unfinished" if manifest is not None else "does not exist"
            raise SFRError(f"{type(self).__name__} re-trains nnU-Net with a fine-tuned generalist, and {folder} "
                           f"{state}. Fine-tune it first (stages 1-2 of SFR, resumable):\n    {command}\nthen start "
                           f"this training again.")
        inputs = manifest.get("inputs", {})
        if inputs.get("configuration") != self.configuration_name or \
                inputs.get("plans_fingerprint") != plans_fingerprint(self.plans_manager.plans,
                                                                     self.configuration_name):
            raise SFRError(f"{os.path.join(folder, 'manifest.json')} was fine-tuned for configuration "
                           f"{inputs.get('configuration')} with other plans than this training's "
                           f"({self.configuration_name}); run: {command}")
        return folder, manifest

    # --------------------------------------------------------------------------------------------- set-up
    def offline_pseudo_labels(self, unlabeled_cases):
        if not self.ssl_settings["pseudo_labels"]:
            return None
        import json

        from nnunet_foundation.pseudo_labels import MANIFEST

        reader = self.open_pseudo_label_cache(unlabeled_cases)
        with open(os.path.join(reader.folder, MANIFEST)) as f:
            made_by = json.load(f).get("sfr_generalist_sha256")
        if made_by != self.sfr_manifest["final_sha256"]:
            raise SFRError(f"the pseudo-label cache {reader.folder} was not made by the fine-tuned generalist in "
                           f"{self.sfr_folder} (its manifest records {made_by}); remake it with nnunet-foundation sfr "
                           f"... --pseudo-labels, or unset pseudo_labels to label online")
        self.print_to_log_file(f"SFR pseudo-labels from the offline cache {reader.folder} (made by the fine-tuned "
                               f"generalist {self.sfr_folder}; no generalist runs during training)")
        return reader

    def build_ssl_modules(self):
        super().build_ssl_modules()
        if self.ssl_settings["pseudo_labels"]:
            return
        from nnunet_foundation.foundation.config import describe_generalist

        final = load_final(self.sfr_folder)
        self.generalist = build_sfr_generalist(final["config"], final["adapted"], self.device)
        for p in self.generalist.parameters():  # frozen in re-training: nothing of it learns
            p.requires_grad_(False)
        self.generalist.train(False)
        self.sfr_axis = slice_axis(final["config"], len(self.configuration_manager.patch_size) == 2)
        self.print_to_log_file(f"SFR generalist, frozen, fine-tuned in {self.sfr_folder} "
                               f"({self.sfr_manifest.get('rounds', 1)} round(s)): {describe_generalist(final['config'])}")

    # ------------------------------------------------------------------------------------------ the term
    @torch.no_grad()
    def online_pseudo_label(self, x: torch.Tensor) -> torch.Tensor:
        """Stitch -> forward -> un-stitch: the frozen generalist's argmax ``(B, *patch)`` for unlabeled patches."""
        from nnunet_foundation.methods.sfr.stitching import stitched_patch_logits

        self.generalist.train(False)
        # the channel (or "rgb") the generalist was fine-tuned on
        return stitched_patch_logits(self.generalist, x.float(), self.sfr_axis,
                                     self.generalist.config.image_channel).argmax(1)

    def unsupervised_loss(self, student_out_u, unlabeled):
        loss, logs = super().unsupervised_loss(student_out_u, unlabeled)
        weight = float(self.ssl_settings["sfr_weight"])
        started = time.perf_counter()
        if "pseudo_label" in unlabeled:
            from nnunet_foundation.training.unlabeled_stream import known_pseudo_label

            label, known = known_pseudo_label(unlabeled["pseudo_label"])
        else:
            label = self.online_pseudo_label(unlabeled["data"]).to(student_out_u[0].device)
            known = None
        seconds = time.perf_counter() - started
        term = over_scales(half_ce_dice, self.deep_supervision_weights(), student_out_u, label, known)
        logs.update({"sfr_loss": term.detach(), "sfr_weight": weight, "generalist_seconds": seconds,
                     "pseudo_coverage": 1.0 if known is None else float(known.float().mean())})
        return loss + weight * term, logs

    # -------------------------------------------------------------------------------------------- checkpoint
    def ssl_state_dict(self):
        return {**super().ssl_state_dict(), GENERALIST_DIGEST_KEY: self.sfr_manifest["final_sha256"]}

    def load_ssl_state_dict(self, state):
        recorded = state.get(GENERALIST_DIGEST_KEY)
        if recorded != self.sfr_manifest["final_sha256"]:
            raise SFRError(f"Refusing to resume: this run learned from the fine-tuned generalist with SHA-256 "
                           f"{recorded}, and {os.path.join(self.sfr_folder, FINAL_FILE)} is now another one "
                           f"({self.sfr_manifest['final_sha256']}). Restore it, or start a new run without --c.")
        super().load_ssl_state_dict(state)


__all__ = ["nnUNetTrainerSFR", *make_budget_variants(nnUNetTrainerSFR, globals())]
