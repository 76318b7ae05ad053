"""Mixed-domain semi-supervised segmentation with unknown domains: a Copy-Paste Mechanism and Cluster MMD on a
teacher-student pair, on nnU-Net.

Source: a paper abstract (no code published): a teacher-student framework; a Copy-Paste Mechanism (CPM) moves regions
between labeled and unlabeled images in both directions; a Cluster Maximum Mean Discrepancy (CMMD) block clusters the
unlabeled features and aligns each cluster with labeled anchor features, for domain-invariant features without domain
labels. Everything the abstract leaves open is ours, and chosen as follows:

* Teacher: the EMA of the student (Mean Teacher, decay ``ema_decay``), whose argmax on the noise-perturbed unlabeled
  crop is the pseudo-label; inference uses the teacher, as for Mean Teacher.
* CPM, bidirectional as in BCP (Bai et al., CVPR 2023) and SynFoC: per unlabeled crop u and a labeled crop l (the
  labeled batch cycled), one random box; "in" = u with l's box pasted, "out" = l with u's box pasted. Targets are the
  label where the pixels came from l and the teacher's pseudo-label where they came from u. Loss: CE + Dice on the
  label-sourced region + ``pseudo_region_weight`` (BCP's 0.5) x CE + Dice on the pseudo-labeled region, each at every
  deep-supervision scale with nnU-Net's weights. Mixing images of different domains makes every crop show both.
* CMMD: the student's bottleneck features (the last encoder stage, one vector per location) of the clean labeled
  and unlabeled crops, ``mmd_samples`` random vectors of each; k-means (``mmd_clusters``, k-means++ start, 10 Lloyd
  steps, recomputed each iteration: no state) on the unlabeled vectors; each labeled vector joins its nearest
  centroid. Per cluster, the MMD with a sum of Gaussian kernels (bandwidths ``mmd_bandwidths`` x the median squared
  distance) between its unlabeled vectors and its labeled anchors (all labeled vectors where the cluster has fewer
  than two); the mean over clusters. Anchors carry no gradient: the unlabeled features move towards the labeled
  ones, whose features the supervised loss grounds, not the other way round. Per-cluster alignment keeps the modes of
  the data (organ, background, lesion) apart instead of pulling all unlabeled features onto the labeled mean.
* Weights: L = L_sup + ``unsup_weight`` (1, no ramp-up, as BCP) x (L_cpm + ``mmd_weight`` x L_cmmd).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice, over_scales
from nnunet_foundation.training.networks import captured_encoder_output
from nnunet_foundation.training.semi_supervised import LossParts
from nnunet_foundation.training.views import paste_boxes, random_boxes


def kmeans(x: torch.Tensor, k: int, steps: int = 10, generator: Optional[torch.Generator] = None
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(assignment (N,), centroids (k, D)) of ``x (N, D)``: k-means++ seeding, then Lloyd steps. ``k`` is capped at N;
    an emptied cluster keeps its centroid."""
    x = x.detach().float()
    k = min(k, x.shape[0])
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centroids = [x[first]]
    for _ in range(1, k):  # each next seed drawn with probability ~ squared distance to the nearest seed
        d2 = torch.cdist(x, torch.stack(centroids)).pow(2).min(1).values
        if float(d2.sum()) <= 0:
            break
        centroids.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))])
    centroids = torch.stack(centroids)
    for _ in range(steps):
        assignment = torch.cdist(x, centroids).argmin(1)
        for c in range(centroids.shape[0]):
            members = assignment == c
            if members.any():
                centroids[c] = x[members].mean(0)
    return torch.cdist(x, centroids).argmin(1), centroids


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Squared MMD (biased estimate, >= 0) between samples ``x (N, D)`` and ``y (M, D)`` with the kernel
    sum_b exp(-|a - b|^2 / (b * m)), m the median squared distance of the pooled samples (no gradient through m)."""
    pooled = torch.cat((x, y)).float()
    d2 = torch.cdist(pooled, pooled).pow(2)
    scale = d2.detach()[d2.detach() > 0].median() if bool((d2.detach() > 0).any()) else d2.new_tensor(1.0)
    kernel = sum(torch.exp(-d2 / (b * scale)) for b in bandwidths)
    n = x.shape[0]
    return (kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()).clamp_min(0)


def feature_vectors(features: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random location vectors ``(count, C)`` of ``(B, C, *spatial)`` features (all if there are fewer)."""
    vectors = features.movedim(1, -1).reshape(-1, features.shape[1])
    if vectors.shape[0] > count:
        vectors = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[:count]]
    return vectors


def cluster_mmd(unlabeled: torch.Tensor, anchors: torch.Tensor, clusters: int, bandwidths: Sequence[float]
                ) -> torch.Tensor:
    """Mean over k-means clusters of the unlabeled vectors of the MMD between a cluster's unlabeled vectors and its
    labeled anchors (the anchors nearest to its centroid; all anchors where fewer than two are)."""
    assignment, centroids = kmeans(unlabeled, clusters)
    anchor_assignment = torch.cdist(anchors.detach().float(), centroids).argmin(1)
    terms = []
    for c in range(centroids.shape[0]):
        members = unlabeled[assignment == c]
        if members.shape[0] < 2:
            continue
        own = anchors[anchor_assignment == c]
        terms.append(gaussian_mmd(members, (own if own.shape[0] >= 2 else anchors).detach(), bandwidths))
    return torch.stack(terms).mean() if terms else unlabeled.sum() * 0


class nnUNetTrainerMixedDomain(nnUNetTrainerMeanTeacher):
    default_settings = {
        **nnUNetTrainerMeanTeacher.default_settings,
        "unsup_weight": 1.0,
        "rampup_shape": "none",
        # weight of the pseudo-labeled region of a mixed crop against its label-sourced region (BCP: 0.5)
        "pseudo_region_weight": 0.5,
        # the pasted box's share of the crop
        "paste_min_area": 0.1,
        "paste_max_area": 0.5,
        "mmd_weight": 0.1,
        "mmd_clusters": 4,
        "mmd_samples": 256,
        "mmd_bandwidths": [0.25, 0.5, 1.0, 2.0, 4.0],
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "copy_paste_loss", "cmmd_loss", "teacher_confidence")

    def paste_box(self, like: torch.Tensor) -> torch.Tensor:
        s = self.ssl_settings
        return random_boxes(tuple(like.shape[2:]), like.shape[0], min_area=s["paste_min_area"],
                            max_area=s["paste_max_area"], device=like.device)

    @staticmethod
    def both_directions(box: torch.Tensor, of_labeled: torch.Tensor, of_unlabeled: torch.Tensor) -> torch.Tensor:
        """The copy-paste of images or per-voxel maps: "in" (the unlabeled crop with the labeled crop's box) then
        "out" (the labeled crop with the unlabeled crop's box); the labeled batch is cycled to the unlabeled size."""
        partner = torch.arange(of_unlabeled.shape[0], device=of_unlabeled.device) % of_labeled.shape[0]
        of_labeled = of_labeled[partner]
        return torch.cat((paste_boxes(box, of_unlabeled, of_labeled), paste_boxes(box, of_labeled, of_unlabeled)))

    def compute_losses(self, labeled, unlabeled):
        s = self.ssl_settings
        x_l, x_u = labeled["data"], unlabeled["data"]
        target = labeled["target"][0] if isinstance(labeled["target"], (list, tuple)) else labeled["target"]
        y_l = target[:, 0].long()
        known = torch.ones_like(y_l, dtype=torch.bool)
        if self.label_manager.has_ignore_label:  # ignored voxels teach nothing, in the mixed crops either
            known = y_l != self.label_manager.ignore_label
            y_l = torch.where(known, y_l, 0)
        with captured_encoder_output(self.network) as captured:
            out_l, out_u = self.forward_labeled_and_unlabeled(x_l, x_u)
        bottleneck = captured["features"][-1]
        n_l = x_l.shape[0]
        cmmd = cluster_mmd(feature_vectors(bottleneck[n_l:], s["mmd_samples"]),
                           feature_vectors(bottleneck[:n_l], s["mmd_samples"]), s["mmd_clusters"],
                           s["mmd_bandwidths"])

        with torch.no_grad():
            confidence, pseudo = torch.softmax(self.teacher_predict(x_u)[0].float(), 1).max(1)
        box = self.paste_box(x_u)
        images = self.both_directions(box, x_l, x_u)
        targets = self.both_directions(box, y_l, pseudo)
        from_label = torch.cat((box, ~box))  # "in" crops: labeled pixels inside the box; "out" crops: outside it
        label_region = from_label & self.both_directions(box, known, torch.ones_like(pseudo, dtype=torch.bool))
        pseudo_region = ~from_label
        out_mix = self.as_list(self.network(images))
        scales = self.deep_supervision_weights()
        copy_paste = over_scales(ce_dice, scales, out_mix, targets, label_region) + \
            s["pseudo_region_weight"] * over_scales(ce_dice, scales, out_mix, targets, pseudo_region)
        unsupervised = copy_paste + s["mmd_weight"] * cmmd
        weight = self.unsup_weight()
        clean_term, clean_logs = self.clean_unlabeled_terms(out_u, unlabeled)
        return LossParts(self.supervised_loss(out_l, labeled["target"]), weight * unsupervised + clean_term, {
            "unsup_loss": unsupervised.detach(), "unsup_weight": weight, "copy_paste_loss": copy_paste.detach(),
            "cmmd_loss": cmmd.detach(), "teacher_confidence": confidence.mean(), **clean_logs})

    def clean_unlabeled_terms(self, student_out_u, unlabeled):
        """Weighted terms on the student's output for the clean (unmixed) unlabeled crop, after the teacher's pass,
        and their log values: none here, since the copy-paste replaces Mean Teacher's consistency; SemiSAM's generalist
        term in nnUNetTrainerSemiSAMMixedDomain."""
        return student_out_u[0].sum() * 0.0, {}


__all__ = ["nnUNetTrainerMixedDomain", *make_budget_variants(nnUNetTrainerMixedDomain, globals())]
