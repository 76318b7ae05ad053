"""The generalist alone as a segmentation model: a trained nnU-Net prompts it on each input case and its answer is
the prediction (the "generalist alone" row of a study: what the foundation model brings, and what it inherits from
its prompter's misses and false positives).

:class:`PromptedGeneralistPredictor` is nnU-Net's own predictor with one step replaced: after preprocessing, nnU-Net's
sliding-window softmax of the case prompts the generalist (the same ``Generalist`` call as the offline pseudo-labels),
and the generalist's class probabilities go to nnU-Net's export as log-probabilities. Reading, preprocessing,
resampling back to the input geometry and writing are therefore exactly ``nnUNetv2_predict``'s, and the output can be
scored like any nnU-Net prediction. Classes the generalist was not prompted for (nnU-Net found nothing) are
background.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

#: log(0) stand-in: nnU-Net's export applies softmax to what this predictor returns
_LOG_FLOOR = 1e-6


def make_prompted_generalist_predictor(generalist, **predictor_kwargs):
    """An ``nnUNetPredictor`` whose logits are log(generalist probabilities) prompted by its own network's softmax."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class PromptedGeneralistPredictor(nnUNetPredictor):
        def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
            specialist = torch.softmax(super().predict_logits_from_preprocessed_data(data).float(), 0)
            with torch.no_grad():
                out = generalist(data[None].float().to(generalist.device), specialist[None].to(generalist.device))
            return torch.log(out.probabilities[0].float().clamp_min(_LOG_FLOOR)).cpu()

    return PromptedGeneralistPredictor(**predictor_kwargs)


def predict_with_generalist(dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence[str],
                            checkpoint: str, generalist_config: dict, input_folder: str, output_folder: str,
                            device: torch.device, num_processes: int = 1) -> int:
    """Segment every case of ``input_folder`` (nnU-Net raw naming) with the generalist prompted by the trained model;
    returns the number of cases written."""
    from nnunet_foundation.foundation.config import build_generalist
    from nnunet_foundation.specialist import trained_model_folder

    model_folder, fold_ids = trained_model_folder(dataset, trainer, plans, configuration, folds, checkpoint)
    if not os.path.isdir(input_folder):
        raise FileNotFoundError(f"input folder {input_folder} does not exist")
    generalist = build_generalist(generalist_config).to(device).eval()
    predictor = make_prompted_generalist_predictor(
        generalist, use_mirroring=False, perform_everything_on_device=device.type == "cuda", device=device,
        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, fold_ids, checkpoint_name=checkpoint)
    if num_processes == 0:  # nnU-Net's sequential path: no worker processes (each would import torch again)
        os.makedirs(output_folder, exist_ok=True)  # that path writes its arguments there before making it
        results = predictor.predict_from_files_sequential(input_folder, output_folder, save_probabilities=False,
                                                          overwrite=True)
    else:
        results = predictor.predict_from_files(input_folder, output_folder, save_probabilities=False,
                                               overwrite=True, num_processes_preprocessing=num_processes,
                                               num_processes_segmentation_export=num_processes)
    return len(results) if results is not None else 0
