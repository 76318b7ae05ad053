"""The unlabeled data stream: random crops of unlabeled cases through nnU-Net's own augmentation pipeline.

nnU-Net's training transforms are reused (so a subclass that changes augmentation changes both streams), with the
transforms that need a label map removed. Methods that want strong views get the *weak* view here (the geometric
transforms only: spatial + mirroring); their strong views are made from it on the device (training/views.py).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
    RemoveRandomConnectedComponentFromOneHotEncodingTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

# transforms that read or write the label map: meaningless without one
_LABEL_TRANSFORMS = (RemoveLabelTansform, DownsampleSegForDSTransform, MaskImageTransform,
                     ConvertSegmentationToRegionsTransform, MoveSegAsOneHotToDataTransform,
                     ApplyRandomBinaryOperatorTransform, RemoveRandomConnectedComponentFromOneHotEncodingTransform)
_GEOMETRIC_TRANSFORMS = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)
#: pseudo-label value "no information" (nnunet_foundation.pseudo_labels.IGNORE), also what the crop pads with
PSEUDO_IGNORE = 255


def known_pseudo_label(pseudo_label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch['pseudo_label']`` ``(B, 1, *patch)`` -> (class indices ``(B, *patch)``, 0 where the cache says
    nothing; the mask of voxels it does say something about)."""
    label = pseudo_label[:, 0].long()
    known = (label >= 0) & (label != PSEUDO_IGNORE)
    return torch.where(known, label, torch.zeros_like(label)), known


def _inner(t):
    return t.transform if isinstance(t, RandomTransform) else t


def split_training_transforms(transforms: ComposeTransforms) -> Tuple[ComposeTransforms, ComposeTransforms]:
    """nnU-Net's training pipeline -> (all image transforms, weak = the geometric ones only)."""
    image_only = [t for t in transforms.transforms if not isinstance(_inner(t), _LABEL_TRANSFORMS)]
    weak = [t for t in image_only if isinstance(_inner(t), _GEOMETRIC_TRANSFORMS)]
    return ComposeTransforms(image_only), ComposeTransforms(weak)


class UnlabeledDataLoader(nnUNetDataLoader):
    """Batches of unlabeled patches: ``{'data': (B, C, *patch), 'keys': [...]}``.

    Crops are uniform at random over the (padded) image: unlabeled cases have no class locations, and for benchmark
    cases whose labels exist on disk the stored locations must not steer sampling.
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 transforms: ComposeTransforms, pseudo_labels: Optional[Callable[[str], np.ndarray]] = None):
        """``pseudo_labels``: case -> its offline pseudo-label map ``(D, H, W)`` (uint8, :data:`PSEUDO_IGNORE` where
        it says nothing), cropped and transformed with the image: ``batch['pseudo_label']`` ``(B, 1, *patch)``."""
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.has_ignore = False  # with an ignore label nnU-Net would crop around annotated voxels: not here
        self.pseudo_labels = pseudo_labels

    def generate_train_batch(self):
        keys = self.get_indices()
        data_all = seg_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, _, _, _ = self._data.load_case(key)
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], force_fg=False, class_locations=None)
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                patch = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                seg = None
                if self.pseudo_labels is not None:
                    # the pseudo-label takes exactly the image's crop and spatial transforms (as nnU-Net's labels)
                    label = self.pseudo_labels(key)[None]
                    seg = torch.from_numpy(crop_and_pad_nd(label, bbox, PSEUDO_IGNORE).astype(np.int16))
                if self.patch_size_was_2d:
                    patch = patch[:, 0]
                    seg = None if seg is None else seg[:, 0]
                if self.transforms is not None:
                    out = self.transforms(**({"image": patch} if seg is None else {"image": patch,
                                                                                   "segmentation": seg}))
                    patch, seg = out["image"], out.get("segmentation")
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *patch.shape), dtype=torch.float32)
                    if seg is not None:
                        seg_all = torch.empty((self.batch_size, *seg.shape), dtype=torch.int16)
                data_all[j] = patch
                if seg is not None:
                    seg_all[j] = seg
        batch = {"data": data_all, "keys": keys}
        if self.pseudo_labels is not None:
            batch["pseudo_label"] = seg_all
        return batch


def split_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """nnU-Net's DDP batch split: the global batch is spread over ranks, the first ranks take the remainder."""
    if global_batch_size < world_size:
        raise ValueError(f"unlabeled batch size {global_batch_size} is smaller than the number of GPUs "
                         f"({world_size}); raise nnUNet_ssl_unlabeled_batch_size.")
    return global_batch_size // world_size + (1 if rank < global_batch_size % world_size else 0)


def describe_transforms(transforms: ComposeTransforms) -> List[str]:
    return [type(_inner(t)).__name__ for t in transforms.transforms]


__all__ = ["UnlabeledDataLoader", "split_training_transforms", "split_batch_size", "describe_transforms"]
