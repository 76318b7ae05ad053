"""A trained nnU-Net model as the specialist that prompts generalists outside training (generalist-quality,
pseudo-label): its softmax on nnU-Net preprocessed cases, through nnU-Net's own predictor (same sliding window,
Gaussian weighting and network as ``nnUNetv2_predict``)."""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Sequence

import numpy as np
import torch


def trained_model_folder(dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence[str],
                         checkpoint: str):
    """``(training output folder, fold ids)`` of a trained model whose folds all have ``checkpoint``.

    Raises:
        FileNotFoundError: a fold's checkpoint is missing, with the command that makes it.
    """
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folder = get_output_folder(dataset, trainer, plans, configuration)
    fold_ids = [f if f == "all" else int(f) for f in folds]
    for fold in fold_ids:
        path = os.path.join(folder, f"fold_{fold}", checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no trained model at {path}: train it first (nnUNetv2_train {dataset} "
                                    f"{configuration} {fold} -tr {trainer} -p {plans}) or fix -tr/-p/-f/-chk")
    return folder, fold_ids


def load_specialist(dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence[str],
                    checkpoint: str, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """``data (C, D, H, W) float32 -> softmax (K, D, H, W)`` on the CPU, of the trained model's folds (ensembled).

    Raises:
        FileNotFoundError: no trained model folder or checkpoint, with the command that makes it.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder, fold_ids = trained_model_folder(dataset, trainer, plans, configuration, folds, checkpoint)
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=device.type == "cuda",
                                device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, fold_ids, checkpoint_name=checkpoint)

    def predict(data: np.ndarray) -> torch.Tensor:
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
        return torch.softmax(logits.float(), 0).cpu()

    return predict


def checkpoint_digest(dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence[str],
                      checkpoint: str) -> str:
    """SHA-256 over the specialist's checkpoint files: what a pseudo-label cache was made from."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_foundation.foundation.checkpoints import file_sha256

    folder = get_output_folder(dataset, trainer, plans, configuration)
    digest = hashlib.sha256()
    for fold in folds:
        digest.update(file_sha256(os.path.join(folder, f"fold_{fold}", checkpoint)).encode())
    return digest.hexdigest()
