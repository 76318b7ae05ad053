"""Predict with the SAM that a co-training method fine-tuned beside nnU-Net, the way ``nnUNetv2_predict`` predicts
with nnU-Net.

SynFoC and SC-SAM train an nnU-Net and a SAM-family model together; ``network_weights`` (what ``nnUNetv2_predict``
runs) is the nnU-Net. The SAM's adapted tensors (LoRA, prompt encoder/decoder and the method's own parts) and the
configuration of its base checkpoint are in the same ``checkpoint_*.pth`` under ``ssl_state``, with the name of the
network that runs it at prediction time (``sam_network``, one of :data:`SAM_NETWORKS`): SynFoC's prompt-free
multi-class head, or SC-SAM's SAM prompted by the trained nnU-Net. This module rebuilds that network, loads each
fold's tensors, and hands it to nnU-Net's own predictor, so both models see identical preprocessing, sliding windows,
mirroring and export and their scores can be compared directly::

    nnunet-foundation predict-sam-student -i imagesTs -o pred_sam -d 4 -c 3d_fullres -f 0 -tr nnUNetTrainerSynFoC
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

# ssl_state keys of a co-training checkpoint, written by the trainers and read here: the adapted tensors of the SAM
# (and of its EMA teacher, SynFoC), the configuration of the base SAM they adapt, and which network predicts with it
SAM_STUDENT_KEY = "sam_student"
SAM_TEACHER_KEY = "sam_teacher"
SAM_CONFIG_KEY = "sam_config"
SAM_NETWORK_KEY = "sam_network"
#: backends whose image encoder takes LoRA and whose prompt encoder / decoder are SAM's (the co-trained models)
LORA_BACKENDS = ("sam", "medsam", "litemedsam")


def resolve_cotrained_generalist(setting, owner: str, configuration_manager, implied: Optional[dict] = None) -> dict:
    """The one generalist configuration a co-training method fine-tunes, from its ``generalists`` setting (default
    LiteMedSAM): exactly one, of a LoRA-capable backend, sliced along the plan's lowest-resolution axis in 3D.
    ``implied``: defaults the method adds for keys the user left out (SC-SAM: colour on an RGB dataset)."""
    from nnunet_foundation.foundation.config import resolve_generalists

    spacing = configuration_manager.spacing if len(configuration_manager.patch_size) == 3 else None
    (config,) = resolve_generalists(setting, owner, implied=implied, spacing=spacing, exactly_one=True)
    if config["backend"] not in LORA_BACKENDS:
        raise ValueError(f"{owner}: LoRA fine-tuning is implemented for the {LORA_BACKENDS} backends, not "
                         f"{config['backend']!r}")
    return config


#: name in ``ssl_state[SAM_NETWORK_KEY]`` -> the class (imported lazily) that predicts with that SAM. A checkpoint
#: without the key is SynFoC's (written before the key existed).
SAM_NETWORKS = {
    "multiclass_head": "nnunet_foundation.foundation.cotrained_sam:SAMStudentNetwork",
    "specialist_prompted": "nnunet_foundation.methods.scsam.sam_network:SpecialistPromptedSAMNetwork",
}


def sam_network_class(name: str):
    if name not in SAM_NETWORKS:
        raise ValueError(f"unknown co-trained SAM network {name!r} in the checkpoint; known: {sorted(SAM_NETWORKS)}")
    module, cls = SAM_NETWORKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class SAMStudentNetwork(nn.Module):
    """A SAM generalist with a multi-class head as an nnU-Net inference network:
    ``(B, C, [D,] H, W)`` patches -> ``(B, num_classes, [D,] H, W)`` logits, slice-wise as in training."""

    def __init__(self, generalist):
        super().__init__()
        self.generalist = generalist

    @classmethod
    def from_checkpoint(cls, sam_config: dict, ssl_state: dict, plans_manager, configuration_manager,
                        dataset_json: dict) -> "SAMStudentNetwork":
        """The network of a checkpoint (base SAM built from ``sam_config``); the fold's tensors come later."""
        from nnunet_foundation.foundation.config import build_generalist

        return cls(build_generalist(sam_config))

    @staticmethod
    def fold_parameters(checkpoint: dict, sam_key: str) -> dict:
        """What ``load_state_dict`` receives for one fold: the SAM's adapted tensors."""
        return dict(checkpoint["ssl_state"][sam_key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generalist.multiclass_head.segment_patches(self.generalist, x)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # nnUNetPredictor calls load_state_dict with each fold's parameters before predicting with that fold. A
        # fold's parameters here are its adapted tensors only: the frozen SAM backbone is the same for every fold
        # and stays loaded once. (strict/assign are accepted for the nn.Module signature; loading is always strict.)
        from nnunet_foundation.foundation.lora import load_adaptable_state_dict

        load_adaptable_state_dict(self.generalist, state_dict)


def _fold_checkpoint(model_folder: Path, fold: Union[int, str], checkpoint_name: str) -> Path:
    path = model_folder / f"fold_{fold}" / checkpoint_name
    if not path.is_file():
        available = sorted(p.name for p in (model_folder / f"fold_{fold}").glob("checkpoint_*.pth")) \
            if (model_folder / f"fold_{fold}").is_dir() else []
        hint = (f"checkpoints in that fold: {', '.join(available)}; pick one with -chk" if available else
                f"train it first: nnUNetv2_train DATASET CONFIGURATION {fold} -tr TRAINER")
        raise FileNotFoundError(f"no checkpoint {path}; {hint}")
    return path


def load_sam_students(model_folder: Union[str, Path], folds: Sequence[Union[int, str]],
                      checkpoint_name: str = "checkpoint_final.pth", use_teacher: bool = False,
                      sam_checkpoint: Optional[str] = None, device: torch.device = torch.device("cpu")):
    """Build the co-trained SAM of one or more folds of a SynFoC or SC-SAM run.

    Returns ``(network, parameters, checkpoint_info)``: one network of the checkpoint's ``sam_network`` kind (base SAM
    loaded once), the parameters of every fold (for nnU-Net's fold ensembling), and the first fold's checkpoint
    fields that nnU-Net's predictor needs (trainer name, configuration, mirroring axes).
    ``use_teacher`` takes the EMA teacher's tensors instead of the student's (SynFoC). ``sam_checkpoint`` replaces the
    path of the base SAM weights recorded at training time (for a run moved to another machine).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_folder = Path(model_folder)
    parameters: List[dict] = []
    sam_config = info = network_name = first_state = None
    key = SAM_TEACHER_KEY if use_teacher else SAM_STUDENT_KEY
    for fold in folds:
        path = _fold_checkpoint(model_folder, fold, checkpoint_name)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        ssl_state = checkpoint.get("ssl_state") or {}
        if SAM_CONFIG_KEY not in ssl_state or SAM_STUDENT_KEY not in ssl_state:
            raise ValueError(f"{path} holds no fine-tuned SAM (trainer {checkpoint.get('trainer_name')!r}); only "
                             f"co-training checkpoints (-tr nnUNetTrainerSynFoC..., nnUNetTrainerSCSAM...) have one. "
                             f"For the nnU-Net network use nnUNetv2_predict.")
        if key not in ssl_state:
            raise ValueError(f"{path} holds no EMA teacher of its SAM (trainer {checkpoint.get('trainer_name')!r} "
                             f"trains none); predict without --teacher")
        config = dict(ssl_state[SAM_CONFIG_KEY])
        if sam_checkpoint is not None:
            config["checkpoint"] = str(sam_checkpoint)
        name = ssl_state.get(SAM_NETWORK_KEY, "multiclass_head")
        if sam_config is None:
            sam_config, network_name, first_state = config, name, ssl_state
            info = {"trainer_name": checkpoint["trainer_name"],
                    "configuration": checkpoint["init_args"]["configuration"],
                    "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes")}
        elif config != sam_config or name != network_name:
            changed = sorted(k for k in set(config) | set(sam_config) if config.get(k) != sam_config.get(k))
            raise ValueError(f"{path}: its SAM configuration differs from fold {folds[0]}'s in "
                             f"{changed or [SAM_NETWORK_KEY]}; folds with different base models cannot be "
                             f"ensembled, predict them separately")
        parameters.append(sam_network_class(name).fold_parameters(checkpoint, key))

    base = sam_config.get("checkpoint")
    if base and not Path(base).is_file():
        raise FileNotFoundError(
            f"the base SAM weights {base} are missing: a co-training checkpoint stores only the adapted tensors "
            f"(LoRA, decoder, head) and rebuilds the rest from the checkpoint it was trained from. Pass its current "
            f"location with --sam-checkpoint PATH.")
    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    network = sam_network_class(network_name).from_checkpoint(
        sam_config, first_state, plans_manager, plans_manager.get_configuration(info["configuration"]),
        load_json(str(model_folder / "dataset.json"))).to(device)
    network.load_state_dict(parameters[0])
    network.eval()
    return network, parameters, info


def predict_sam_student(model_folder: Union[str, Path], input_folder: str, output_folder: str,
                        folds: Sequence[Union[int, str]] = (0,), checkpoint_name: str = "checkpoint_final.pth",
                        use_teacher: bool = False, sam_checkpoint: Optional[str] = None,
                        device: torch.device = torch.device("cpu"), use_mirroring: bool = True,
                        tile_step_size: float = 0.5, num_processes_preprocessing: int = 3,
                        num_processes_segmentation_export: int = 3, save_probabilities: bool = False,
                        verbose: bool = False) -> Tuple[int, dict]:
    """Segment every case of ``input_folder`` (nnU-Net raw naming) with the co-trained SAM into ``output_folder``.

    Returns ``(number of cases, checkpoint info)``.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_folder = Path(model_folder)
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise FileNotFoundError(f"{model_folder / name} is missing: {model_folder} is not an nnU-Net training "
                                    f"output folder (expected TRAINER__PLANS__CONFIGURATION with {name})")
    if not Path(input_folder).is_dir():
        raise FileNotFoundError(f"input folder {input_folder} does not exist")
    network, parameters, info = load_sam_students(model_folder, folds, checkpoint_name, use_teacher,
                                                  sam_checkpoint, device)
    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    dataset_json = load_json(str(model_folder / "dataset.json"))
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=verbose, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration(info["configuration"]),
                                    parameters, dataset_json, info["trainer_name"],
                                    info["inference_allowed_mirroring_axes"])
    if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
        # nnUNetv2_predict -npp 0 -nps 0: nnU-Net's sequential path, no worker processes (the benchmark's -np 0)
        os.makedirs(output_folder, exist_ok=True)  # that path writes its arguments there before making it
        predictor.predict_from_files_sequential(input_folder, output_folder, save_probabilities=save_probabilities,
                                                overwrite=True)
    else:
        predictor.predict_from_files(input_folder, output_folder, save_probabilities=save_probabilities,
                                     overwrite=True, num_processes_preprocessing=num_processes_preprocessing,
                                     num_processes_segmentation_export=num_processes_segmentation_export)
    # the number of input cases (the sequential path returns nothing for the cases it writes)
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    return len(create_lists_from_splitted_dataset_folder(input_folder, dataset_json["file_ending"])), info
