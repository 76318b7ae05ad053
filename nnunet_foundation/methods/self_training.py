"""Self-training from an offline generalist cache: nnU-Net retrained on its labeled cases plus the generalist's
pseudo-labels of the unlabeled ones (the recipe of issue 14's self-training row, and the self-training step of
FLARE-style pipelines).

``nnunet-foundation pseudo-label`` writes the cache once: a trained model (typically the labeled-only nnU-Net of the
same fold) prompts the generalist (LiteMedSAM by default) on every unlabeled case. Per iteration this trainer then
takes nnU-Net's loss on the labeled patches and ``unsup_weight`` (1, constant) x CE + Dice towards the cached
pseudo-label on the unlabeled patches, at every deep-supervision scale with nnU-Net's scale weights; voxels the cache
marks unknown (not prompted, not confident, padding) carry no weight. Labeled and pseudo-labeled patches share every
batch, so the few true labels are never drowned out by the many pseudo-labelled cases, and the pseudo-labelled crops
go through nnU-Net's augmentation with their label like any training crop.

No teacher and no consistency term: what the unlabeled data teach is exactly the generalist's labels, which makes it
the baseline every foundation-guided method (SemiSAM from the same cache, SFR) has to beat. It exports an EMA of its
weights (``ema_decay``), as the benchmark's bounds (``nnUNetTrainerEMA``) and the teacher-based methods do, so
averaging is not what a comparison measures. Prediction is stock ``nnUNetv2_predict``.

    nnunet-foundation pseudo-label -d D -c C -tr nnUNetTrainer -f F        # cache nnUNetTrainer__nnUNetPlans__foldF
    nnUNet_ssl_pseudo_labels=nnUNetTrainer__nnUNetPlans__foldF nnUNetv2_train D C F -tr nnUNetTrainerSelfTraining

In ``nnunet-foundation benchmark`` it is a ``--cached-trainers`` row: the benchmark makes the cache with each fold's
labeled-only model and names it.
"""
from __future__ import annotations

import torch

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice, over_scales
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised
from nnunet_foundation.training.settings import SettingsError


class nnUNetTrainerSelfTraining(nnUNetTrainerSemiSupervised):
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        # the cached labels weigh like labels from the first iteration: they were made before training and do not
        # get better or worse during it, so nothing needs to ramp
        "unsup_weight": 1.0,
        "rampup_shape": "none",
        # name (or folder) of the offline pseudo-label cache (nnunet-foundation pseudo-label); required
        "pseudo_labels": "",
        "ema_decay": 0.99,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "pseudo_coverage")
    exported_model = "EMA of the weights"

    # nnU-Net's __init__ records its caller's arguments by name (locals()[name] for every parameter of
    # type(self).__init__), so a trainer's __init__ must keep exactly nnU-Net's signature: no *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.ssl_settings["pseudo_labels"]:
            self.ssl_settings["pseudo_labels"] = self.default_pseudo_label_cache()
        if not self.ssl_settings["pseudo_labels"]:
            raise SettingsError(f"{type(self).__name__} learns the unlabeled cases from an offline pseudo-label "
                                f"cache: make one with 'nnunet-foundation pseudo-label -d DATASET -c "
                                f"{configuration} -tr TRAINER -f {fold}' and name it with nnUNet_ssl_pseudo_labels "
                                f"(the command prints the cache's name).")

    def default_pseudo_label_cache(self) -> str:
        """The cache to learn from when the setting names none: none here; IFL's round trainers name their round's."""
        return ""

    def build_ssl_modules(self):
        self.ema = self.add_ema_teacher("ema_weights", self.network, self.ssl_settings["ema_decay"])

    def inference_network(self):
        return self.ema

    def offline_pseudo_labels(self, unlabeled_cases):
        reader = self.open_pseudo_label_cache(unlabeled_cases)
        self.print_to_log_file(f"Self-training on the pseudo-labels of the offline cache {reader.folder}")
        return reader

    def compute_losses(self, labeled, unlabeled):
        from nnunet_foundation.training.unlabeled_stream import known_pseudo_label

        out_l, out_u = self.forward_labeled_and_unlabeled(labeled["data"], unlabeled["data"])
        label, known = known_pseudo_label(unlabeled["pseudo_label"])
        term = over_scales(ce_dice, self.deep_supervision_weights(), out_u, label, known)
        weight = self.unsup_weight()
        return LossParts(self.supervised_loss(out_l, labeled["target"]), weight * term,
                         {"unsup_loss": term.detach(), "unsup_weight": weight,
                          "pseudo_coverage": float(known.float().mean())})


__all__ = ["nnUNetTrainerSelfTraining", *make_budget_variants(nnUNetTrainerSelfTraining, globals())]
