"""WeakMedSAM's offline stages on an nnU-Net raw dataset with slice-level labels: features -> sub-classes ->
classifier -> CAM + prompt-affinity random walk -> pseudo-masks, written as a new nnU-Net raw dataset that the stock
``nnUNetv2_plan_and_preprocess`` / ``nnUNetv2_train`` / ``nnUNetv2_predict`` use unchanged.

Layout of the output dataset ``Dataset<out_id>_<name>``::

    dataset.json            the source's, with numTraining of the output
    imagesTr/               copies of the source images of every weak and every labeled case
    labelsTr/               pseudo-masks of the weak cases; the labeled cases' own masks (copied byte for byte)
    weakmedsam_work/        nnU-Net ignores it: manifest.json (inputs and settings), features/<case>.npy (pooled
                            frozen-encoder embeddings per slice), subclasses.json, classifier.pt, pseudo_stats.json,
                            labeled_check.json (the cases with masks pseudo-labelled the same way and scored against
                            their masks: what the pseudo-masks are worth, before training on them)

Each stage skips what is already on disk, so a killed run continues where it stopped; a folder made from other inputs
or settings is refused, never overwritten. Pseudo-masks are written case by case (atomically) and split over
machines with ``part_id / num_parts``; the global stages (features, sub-classes, classifier) run in a single process
first.

No label file of a weak case is ever opened here: the classifier learns from the side file, the masks come from the
model (``weak_labels.derive_weak_labels`` is the separate, explicit benchmarking step that reads masks). The masks of
the cases that have one are read only by the check on those cases (``check_on_labeled_cases``)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_foundation.atomic_files import write_json_atomically
from nnunet_foundation.foundation.config import single_image_channel
from nnunet_foundation.methods.weakmedsam import affinity as aff
from nnunet_foundation.methods.weakmedsam.subclasses import explore_subclasses, subclass_targets
from nnunet_foundation.methods.weakmedsam.weak_labels import (SIDE_FILE, WeakLabelError, case_files,
                                                              foreground_labels, load_weak_labels, reader_writer)

WORK_FOLDER = "weakmedsam_work"
GATES = ("predicted", "weak-label")


@dataclass
class WeakMedSAMSettings:
    """The method's knobs; defaults are the paper's unless a comment says otherwise."""

    num_subclasses: int = 8            # K sub-classes per class (k-means)
    subclass_weight: float = 0.5       # weight of the sub-class BCE beside the parent BCE
    trainable: str = "lora"            # "lora": LoRA + heads (paper-like); "heads": frozen encoder (CPU-affordable)
    lora_rank: int = 4
    classifier_steps: int = 1000       # ours: the paper trains epochs of its data; steps are comparable across data
    batch_size: int = 8
    lr: float = 1e-4                   # AdamW, one-cycle schedule peaking here (LoRA)
    # ours: the heads' peak learning rate. LiteMedSAM's pooled embeddings are small (norm ~1.2), and at 1e-4 the heads
    # barely move in 1000 steps (4 Hippocampus cases, frozen encoder: held-out image-label accuracy 0.59 after 300
    # steps at 1e-4, 0.90 after 1000 at 1e-2)
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    points_per_side: int = 4           # uniform grid of points_per_side^2 single-point prompts (reference: 4 x 4)
    # ours: what the affinity compares - the prompts' summed probabilities; the reference sums raw logits, which
    # with LiteMedSAM's point answers makes neighbouring affinities ~1e-4 (affinity.prompt_response_map)
    prompt_map: str = "probabilities"
    affinity_radius: float = 5.0       # in embedding cells
    beta: float = 4.0
    walk_steps: int = 4
    blur_sigma: float = 3.5            # px on a 256-px model input (the reference's 21-px kernel), scaled with it
    threshold: float = 0.5
    gate: str = "predicted"            # "predicted" (paper): the classifier's image label; "weak-label": the given one
    seed: int = 0

    def __post_init__(self):
        checks = [(self.num_subclasses >= 1, "num_subclasses >= 1"), (self.subclass_weight >= 0, "subclass_weight >= 0"),
                  (self.trainable in ("lora", "heads"), "trainable 'lora' or 'heads'"),
                  (self.lora_rank >= 1, "lora_rank >= 1"), (self.classifier_steps >= 1, "classifier_steps >= 1"),
                  (self.batch_size >= 1, "batch_size >= 1"), (self.lr > 0, "lr > 0"), (self.head_lr > 0, "head_lr > 0"),
                  (self.weight_decay >= 0, "weight_decay >= 0"), (self.points_per_side >= 1, "points_per_side >= 1"),
                  (self.prompt_map in aff.PROMPT_MAPS, f"prompt_map one of {aff.PROMPT_MAPS}"),
                  (self.affinity_radius > 1, "affinity_radius > 1"), (self.beta > 0, "beta > 0"),
                  (self.walk_steps >= 0, "walk_steps >= 0"), (self.blur_sigma >= 0, "blur_sigma >= 0"),
                  (0 < self.threshold < 1, "0 < threshold < 1"), (self.gate in GATES, f"gate one of {GATES}")]
        bad = [what for ok, what in checks if not ok]
        if bad:
            raise WeakLabelError(f"invalid WeakMedSAM settings: need {', '.join(bad)}")

    @classmethod
    def from_dict(cls, values: dict) -> "WeakMedSAMSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise WeakLabelError(f"unknown WeakMedSAM setting(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**values)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class WeakDataset:
    """The source dataset seen through its side file: which cases are weak, which have masks, their slices."""

    def __init__(self, raw_folder: str, side_file: Optional[str] = None):
        self.folder = raw_folder
        with open(os.path.join(raw_folder, "dataset.json")) as f:
            self.dataset_json = json.load(f)
        self.classes = foreground_labels(self.dataset_json)
        self.side_file = side_file or os.path.join(raw_folder, SIDE_FILE)
        weak = load_weak_labels(raw_folder, self.side_file)
        self.axis, self.weak_labels = weak["axis"], weak["cases"]
        self.ending = self.dataset_json["file_ending"]
        self.num_channels = len(self.dataset_json["channel_names"])
        images = os.path.join(raw_folder, "imagesTr")
        suffix = "_0000" + self.ending
        present = sorted(f[:-len(suffix)] for f in os.listdir(images) if f.endswith(suffix)) \
            if os.path.isdir(images) else []
        labels = os.path.join(raw_folder, "labelsTr")
        # only the names of label files are listed, never their content
        self.labeled = sorted(c for c in present if os.path.isfile(os.path.join(labels, c + self.ending)))
        missing = sorted(set(self.weak_labels) - set(present))
        if missing:
            raise WeakLabelError(f"{self.side_file} lists case(s) without images in {images}: {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}; add their images or remove them from the file")
        # a case with a mask keeps its mask: slice labels are weaker information about the same case
        self.weak = sorted(set(self.weak_labels) - set(self.labeled))
        if not self.weak:
            raise WeakLabelError(f"every case of {self.side_file} has a mask in labelsTr: nothing to pseudo-label")
        self._io = None

    @property
    def io(self):
        if self._io is None:
            self._io = reader_writer(self.dataset_json, case_files(self.folder, self.weak[0], self.ending, 1)[0])
        return self._io

    def labeled_mask_slices(self, case: str) -> np.ndarray:
        """The mask of a case that has one, as ``(S, h, w)`` slices along the side file's axis (labeled cases only:
        a weak case has no mask to read)."""
        if case not in self.labeled:
            raise WeakLabelError(f"{case} is not a case with a mask in {self.folder}/labelsTr")
        seg, _ = self.io.read_seg(os.path.join(self.folder, "labelsTr", case + self.ending))
        return np.ascontiguousarray(np.moveaxis(np.asarray(seg[0]), self.axis, 0))

    def slices(self, case: str, channel: int = 0):
        """``(S, h, w)`` float32 slices of a case along the side file's axis, and the reader's properties."""
        image, properties = self.io.read_images(case_files(self.folder, case, self.ending, self.num_channels))
        volume = np.asarray(image[channel], dtype=np.float32)
        slices = np.moveaxis(volume, self.axis, 0)
        expected = len(self.weak_labels.get(case, slices))  # a case with a mask has no side-file entry to match
        if slices.shape[0] != expected:
            raise WeakLabelError(f"{self.side_file}: case {case!r} lists {expected} slice(s), but its image has "
                                 f"{slices.shape[0]} along axis {self.axis} (shape {volume.shape}); fix the file or "
                                 f"its 'axis'")
        return np.ascontiguousarray(slices), properties, volume.shape


class WeakMedSAMRun:
    """One output dataset's stages (see the module docstring)."""

    def __init__(self, source: WeakDataset, output_folder: str, generalist_config: dict,
                 settings: WeakMedSAMSettings, device: str = "cpu", log: Callable[[str], None] = _log):
        self.source, self.out, self.settings = source, output_folder, settings
        self.generalist_config = generalist_config
        self.device = torch.device(device)
        self.work = os.path.join(output_folder, WORK_FOLDER)
        self.log = log
        self._classifier = None

    # ------------------------------------------------------------------------------------ output folder, manifest
    def manifest(self) -> dict:
        from nnunet_foundation.foundation.config import generalists_by_content

        return {"method": "WeakMedSAM", "source": os.path.basename(os.path.normpath(self.source.folder)),
                "side_file_sha1": _sha1(self.source.side_file), "weak_cases": self.source.weak,
                "labeled_cases": self.source.labeled, "generalist": generalists_by_content(self.generalist_config)[0],
                "settings": dataclasses.asdict(self.settings)}

    def prepare_output(self) -> None:
        """Create the output dataset, or check that an existing one was made from the same inputs."""
        path = os.path.join(self.work, "manifest.json")
        manifest = self.manifest()
        if os.path.isdir(self.out) and os.listdir(self.out):
            if not os.path.isfile(path):
                raise WeakLabelError(f"{self.out} exists and was not written by weak-labels: choose another output "
                                     f"dataset id (-o_d); nothing was changed")
            with open(path) as f:
                old = json.load(f)
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if changed:
                raise WeakLabelError(f"{self.out} was made from other inputs or settings ({', '.join(changed)} "
                                     f"differ; see {path}): choose another output dataset id (-o_d), or delete it "
                                     f"yourself to start over; nothing was changed")
            self.log(f"continuing {self.out}")
        os.makedirs(os.path.join(self.work, "features"), exist_ok=True)
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(self.out, sub), exist_ok=True)
        if not os.path.isfile(path):
            write_json_atomically(manifest, path)

    # ------------------------------------------------------------------------------------------------- models
    def classifier(self):
        if self._classifier is None:
            from nnunet_foundation.methods.weakmedsam.classifier import WeakClassifier, build_encoder_generalist

            generalist = build_encoder_generalist(self.generalist_config, self.settings.trainable,
                                                  self.settings.lora_rank)
            self._classifier = WeakClassifier(generalist, len(self.source.classes), self.settings.num_subclasses,
                                              self.settings.seed).to(self.device)
        return self._classifier

    def _frozen_embed(self, slices: torch.Tensor):
        from nnunet_foundation.methods.weakmedsam.classifier import lora_disabled

        with torch.no_grad(), lora_disabled(self.classifier().generalist):
            return self.classifier().embed(slices)

    # ---------------------------------------------------------------------------------------- stage 1: features
    def feature_file(self, case: str) -> str:
        return os.path.join(self.work, "features", f"{case}.npy")

    def compute_features(self) -> Dict[str, np.ndarray]:
        """Pooled frozen-encoder embedding of every slice of every weak case (k-means, and the 'heads' training)."""
        out = {}
        channel = single_image_channel(self.generalist_config, "weak-labels")
        for n, case in enumerate(self.source.weak):
            path = self.feature_file(case)
            if not os.path.isfile(path):
                slices, _, _ = self.source.slices(case, channel)
                pooled = []
                for s in torch.from_numpy(slices):
                    embedding, geometry = self._frozen_embed(s[None])
                    pooled.append(self.classifier().pool(embedding, geometry)[0].cpu().numpy())
                tmp = path + f".tmp{os.getpid()}.npy"
                np.save(tmp, np.stack(pooled).astype(np.float32))
                os.replace(tmp, path)
                self.log(f"features {n + 1}/{len(self.source.weak)}: {case} ({len(slices)} slice(s))")
            out[case] = np.load(path)
        return out

    # -------------------------------------------------------------------------------------- stage 2: sub-classes
    def slice_index(self) -> List[tuple]:
        return [(case, i) for case in self.source.weak for i in range(len(self.source.weak_labels[case]))]

    def subclasses(self, features: Dict[str, np.ndarray]) -> List[Dict[int, int]]:
        path = os.path.join(self.work, "subclasses.json")
        index = self.slice_index()
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            return [{int(k): v for k, v in saved[case][i].items()} for case, i in index]
        stacked = np.concatenate([features[case] for case in self.source.weak])
        labels = [self.source.weak_labels[case][i] for case, i in index]
        subs = explore_subclasses(stacked, labels, len(self.source.classes), self.settings.num_subclasses,
                                  self.settings.seed)
        per_case: Dict[str, list] = {case: [] for case in self.source.weak}
        for (case, _), s in zip(index, subs):
            per_case[case].append({str(k): v for k, v in s.items()})
        write_json_atomically(per_case, path)
        counts = {c: len({s[c] for s in subs if c in s}) for c in self.source.classes}
        self.log(f"sub-classes: k-means of {len(subs)} slice(s); clusters per class {counts}")
        return subs

    # --------------------------------------------------------------------------------------- stage 3: classifier
    def classifier_file(self) -> str:
        return os.path.join(self.work, "classifier.pt")

    def train_classifier(self, features: Dict[str, np.ndarray], subs: List[Dict[int, int]]) -> None:
        model = self.classifier()
        if os.path.isfile(self.classifier_file()):
            model.load_trained_state(torch.load(self.classifier_file(), map_location=self.device, weights_only=True))
            self.log(f"classifier: loaded {self.classifier_file()}")
            return
        s = self.settings
        index = self.slice_index()
        k = len(self.source.classes)
        parents = torch.tensor(np.stack([np.isin(np.arange(1, k + 1), self.source.weak_labels[c][i])
                                         for c, i in index]).astype(np.float32))
        children = torch.tensor(np.stack([subclass_targets(x, k, s.num_subclasses) for x in subs]))
        pooled = torch.from_numpy(np.concatenate([features[c] for c in self.source.weak]))
        slices = None
        if s.trainable == "lora":  # images in memory: every step encodes its batch through the adapted encoder
            channel = single_image_channel(self.generalist_config, "weak-labels")
            per_case = {c: self.source.slices(c, channel)[0] for c in self.source.weak}
            slices = [torch.from_numpy(per_case[c][i]) for c, i in index]
        params = model.trainable_parameters()
        groups = [{"params": model.head_parameters(), "lr": s.head_lr}]
        if model.generalist.trainable_parameters():
            groups.append({"params": model.generalist.trainable_parameters(), "lr": s.lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                        total_steps=s.classifier_steps)
        generator = torch.Generator().manual_seed(s.seed)
        model.generalist.train(True)
        report_every = max(1, s.classifier_steps // 10)
        self.log(f"classifier: {s.classifier_steps} step(s) of {s.batch_size} slice(s), trainable {s.trainable} "
                 f"({sum(p.numel() for p in params)} parameters), {len(index)} slice(s) "
                 f"({int(parents.sum())} positive class labels)")
        for step in range(s.classifier_steps):
            batch = torch.randint(len(index), (s.batch_size,), generator=generator)
            if slices is None:
                feats = pooled[batch].to(self.device)
            else:
                feats = torch.cat([model.pool(*model.embed(slices[int(i)][None])) for i in batch])
            parent_logits, child_logits = model.logits(feats)
            parent_loss = F.binary_cross_entropy_with_logits(parent_logits, parents[batch].to(self.device))
            child_loss = F.binary_cross_entropy_with_logits(child_logits, children[batch].to(self.device))
            loss = parent_loss + s.subclass_weight * child_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if (step + 1) % report_every == 0 or step + 1 == s.classifier_steps:
                accuracy = ((parent_logits > 0).float() == parents[batch].to(self.device)).float().mean()
                self.log(f"classifier step {step + 1}/{s.classifier_steps}: loss {loss.item():.4f} (parent "
                         f"{parent_loss.item():.4f}, sub-class {child_loss.item():.4f}), batch accuracy "
                         f"{accuracy.item():.2f}")
        model.generalist.train(False)
        tmp = self.classifier_file() + f".tmp{os.getpid()}"
        torch.save(model.trained_state(), tmp)
        os.replace(tmp, self.classifier_file())

    # ------------------------------------------------------------------------------------ stage 4: pseudo-masks
    @torch.no_grad()
    def slice_maps(self, slice_2d: torch.Tensor, weak: Sequence[int]):
        """Per-class refined maps ``(K, h, w)`` in [0, 1], the gate ``(K,)`` and the predicted labels for one slice."""
        from nnunet_foundation.methods.weakmedsam.classifier import content_cells

        model = self.classifier()
        s = self.settings
        embedding, geometry = model.embed(slice_2d[None])
        parent_logits, _ = model.logits(model.pool(embedding, geometry))
        predicted = parent_logits[0] > 0
        given = torch.tensor([c in weak for c in self.source.classes], device=predicted.device)
        gate = predicted if s.gate == "predicted" else given
        k, h, w = len(self.source.classes), *slice_2d.shape
        if not bool(gate.any()):
            return torch.zeros(k, h, w), gate.cpu(), predicted.cpu()
        frozen = self._frozen_embed(slice_2d[None])[0] if s.trainable == "lora" else embedding
        generalist = model.generalist
        points = aff.uniform_point_grid(geometry.resized_hw[0], geometry.resized_hw[1], s.points_per_side)
        points = points[:, None, :].to(frozen.device)
        labels = torch.ones(points.shape[0], 1, dtype=torch.int, device=frozen.device)
        low_res, _ = generalist._decode(frozen.expand(points.shape[0], -1, -1, -1), points, labels, None, None)
        summed = aff.prompt_response_map(low_res, s.prompt_map)  # (1, T/4, T/4)
        summed = F.adaptive_avg_pool2d(summed[None], embedding.shape[-2:])[0]
        rows, cols = content_cells(geometry, embedding.shape[-2:])
        walked = aff.refine_on_content(model.parent_head(embedding)[0], summed[0], rows, cols, s.affinity_radius,
                                       s.beta, s.walk_steps)
        target = geometry.target
        up = F.interpolate(walked[None], size=(target, target), mode="bilinear", align_corners=False)[0]
        up = aff.gaussian_blur(up, s.blur_sigma * target / 256)
        from nnunet_foundation.foundation.geometry import resize_from_model

        maps = resize_from_model(up[None], geometry)[0].clamp(0, 1)
        return maps.cpu(), gate.cpu(), predicted.cpu()

    def label_file(self, case: str) -> str:
        return os.path.join(self.out, "labelsTr", case + self.source.ending)

    def case_masks(self, slices: np.ndarray, slice_labels: Sequence[Sequence[int]]):
        """Pseudo-mask ``(S, h, w)`` of a case's slices and how many slices' class sets the classifier got right."""
        masks, correct = [], 0
        for s, labels in zip(torch.from_numpy(slices), slice_labels):
            maps, gate, predicted = self.slice_maps(s, labels)
            masks.append(aff.masks_from_maps(maps, gate, self.settings.threshold).numpy())
            correct += int(torch.equal(predicted, torch.tensor([c in labels for c in self.source.classes])))
        return np.stack(masks).astype(np.uint8), correct

    def pseudo_label_case(self, case: str) -> dict:
        channel = single_image_channel(self.generalist_config, "weak-labels")
        slices, properties, shape = self.source.slices(case, channel)
        masks, correct = self.case_masks(slices, self.source.weak_labels[case])
        seg = np.moveaxis(masks, 0, self.source.axis).reshape(shape)
        path = self.label_file(case)
        tmp = os.path.join(os.path.dirname(path), f".tmp{os.getpid()}_{os.path.basename(path)}")
        self.source.io.write_seg(seg, tmp, properties)
        os.replace(tmp, path)
        return {"slices": len(slices), "label_correct": correct, "foreground_voxels": int((seg > 0).sum())}

    def copy_inputs(self) -> None:
        """Images of every used case and the labeled cases' masks, copied (never linked: the source stays the user's)."""
        ending = self.source.ending
        for case in self.source.weak + self.source.labeled:
            for src in case_files(self.source.folder, case, ending, self.source.num_channels):
                dst = os.path.join(self.out, "imagesTr", os.path.basename(src))
                if not os.path.isfile(dst):
                    shutil.copyfile(src, dst + ".part")
                    os.replace(dst + ".part", dst)
        for case in self.source.labeled:
            dst = self.label_file(case)
            if not os.path.isfile(dst):
                shutil.copyfile(os.path.join(self.source.folder, "labelsTr", case + ending), dst + ".part")
                os.replace(dst + ".part", dst)
        dataset_json = dict(self.source.dataset_json)
        dataset_json["numTraining"] = len(self.source.weak) + len(self.source.labeled)
        dataset_json["description"] = (f"{self.source.dataset_json.get('description', '')} | WeakMedSAM pseudo-masks "
                                       f"of {len(self.source.weak)} slice-labelled case(s) of "
                                       f"{os.path.basename(os.path.normpath(self.source.folder))}").strip(" |")
        write_json_atomically(dataset_json, os.path.join(self.out, "dataset.json"))

    def run(self, part_id: int = 0, num_parts: int = 1, stop_after: Optional[str] = None) -> dict:
        """All stages (or up to ``stop_after``: ``features``, ``subclasses`` or ``classifier``); returns counts of the
        pseudo-masks written, skipped (already there) and still missing (other parts)."""
        self.prepare_output()
        if num_parts > 1 and not os.path.isfile(self.classifier_file()):
            raise WeakLabelError(f"{self.classifier_file()} does not exist yet: run once with --stop-after classifier "
                                 f"(without -num_parts) to train the classifier, then start the parts")
        if os.path.isfile(self.classifier_file()):
            self.train_classifier({}, [])  # loads it
        else:
            features = self.compute_features()
            if stop_after == "features":
                return {}
            subs = self.subclasses(features)
            if stop_after == "subclasses":
                return {}
            self.train_classifier(features, subs)
        if stop_after == "classifier":
            return {}
        return self.write_pseudo_masks(part_id, num_parts)

    def write_pseudo_masks(self, part_id: int = 0, num_parts: int = 1) -> dict:
        self.copy_inputs()
        part = self.source.weak[part_id::num_parts]
        counts = {"done": 0, "skipped": 0}
        stats_path = os.path.join(self.work, f"pseudo_stats_part{part_id}of{num_parts}.json")
        stats = json.load(open(stats_path)) if os.path.isfile(stats_path) else {}
        for n, case in enumerate(part):
            if os.path.isfile(self.label_file(case)):
                counts["skipped"] += 1
                continue
            started = time.time()
            stats[case] = self.pseudo_label_case(case)
            write_json_atomically(stats, stats_path)
            counts["done"] += 1
            self.log(f"pseudo-mask {n + 1}/{len(part)}: {case} ({stats[case]['slices']} slice(s), image labels "
                     f"predicted right on {stats[case]['label_correct']}, {stats[case]['foreground_voxels']} "
                     f"foreground voxels, {time.time() - started:.1f} s)")
        missing = [c for c in self.source.weak if not os.path.isfile(self.label_file(c))]
        counts["missing"] = len(missing)
        if part_id == 0 and self.source.labeled:
            counts["labeled_check"] = self.check_on_labeled_cases()
        return counts

    def check_on_labeled_cases(self) -> dict:
        """Pseudo-masks of the cases that have masks, made exactly as the weak cases' (slice labels taken from their
        masks; never written), scored against those masks: what the weak cases' pseudo-masks are likely worth,
        before anyone trains on them. Measured on Hippocampus, where the pseudo-masks scored Dice 0.08, a check like
        this is the only warning a user gets (docs/benchmarks/hippocampus_weakmedsam_cpu2d). Saved in
        ``labeled_check.json`` and reused."""
        from nnunet_foundation.evaluation import dice_coefficient

        path = os.path.join(self.work, "labeled_check.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        channel = single_image_channel(self.generalist_config, "weak-labels")
        per_case = {}
        for case in self.source.labeled:
            slices, _, _ = self.source.slices(case, channel)
            truth = self.source.labeled_mask_slices(case)
            slice_labels = [[c for c in self.source.classes if (t == c).any()] for t in truth]
            masks, correct = self.case_masks(slices, slice_labels)
            dice = {str(c): dice_coefficient(masks == c, truth == c) for c in self.source.classes}
            per_case[case] = {"dice": dice, "slices": len(slices), "label_correct": correct,
                              "foreground_fraction": float((masks > 0).mean()),
                              "foreground_fraction_mask": float((truth > 0).mean())}
        mean = {str(c): float(np.mean([v["dice"][str(c)] for v in per_case.values()])) for c in self.source.classes}
        result = {"mean_dice": mean, "cases": per_case}
        write_json_atomically(result, path)
        shown = ", ".join(f"class {c} {v:.3f}" for c, v in mean.items())
        self.log(f"check on the {len(per_case)} case(s) with masks (pseudo-masks made as for the weak cases, scored "
                 f"against their masks; nothing written): Dice {shown}; foreground "
                 f"{np.mean([v['foreground_fraction'] for v in per_case.values()]):.3f} of the voxels vs "
                 f"{np.mean([v['foreground_fraction_mask'] for v in per_case.values()]):.3f} in the masks")
        return result
