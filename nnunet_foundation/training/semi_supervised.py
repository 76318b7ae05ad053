"""The shared semi-supervised trainer: everything a method needs except its loss.

A method subclasses :class:`nnUNetTrainerSemiSupervised` and overrides a few hooks:

* ``default_settings`` — its hyper-parameters (readable from the environment / a config file, see settings.py);
* ``num_strong_views`` — how many strong views of each unlabeled crop it needs (training/views.py);
* ``build_ssl_modules()`` — its extra models, registered with the base (below);
* ``compute_losses(labeled, unlabeled)`` — returns :class:`LossParts`: the supervised term, the weighted
  unsupervised term and the scalars to log (the base minimises their sum and measures the ratio of their gradients);
* ``after_optimizer_step()`` — anything beyond the EMA updates, which the base does;
* ``ssl_state_dict()`` / ``load_ssl_state_dict()`` — state beyond the registered models, for exact ``--c``;
* ``inference_network()`` — the model written to ``network_weights`` for ``nnUNetv2_predict``.

Models are registered in ``build_ssl_modules`` and the base then trains, averages and checkpoints them:
``add_ema_teacher`` (an EMA teacher of any module, updated after each step), ``build_extra_network`` (another nnU-Net
network with nnU-Net's own optimiser set-up, e.g. CPS's second network) and ``add_trained_module`` (any other module
with its optimiser, e.g. SynFoC's SAM). ``forward_labeled_and_unlabeled`` and ``supervised_loss`` are the student
pass and nnU-Net's loss that most methods start from; training/losses.py holds the unsupervised terms.

The base class owns the unlabeled data stream, the ramp-up schedule as a function of training progress t/T,
the optimiser step(s) with nnU-Net's AMP/clipping, checkpointing, logging and settings bookkeeping. Once per epoch it
also measures how strongly the unsupervised term pulls on the student compared with the supervised one
(``grad_ratio_unsup_sup``, see :meth:`nnUNetTrainerSemiSupervised.gradient_norm_ratio`).
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from torch import autocast, nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunet_foundation.training.checkpoint_files import read_checkpoint_for_resume, save_checkpoint_atomically
from nnunet_foundation.training.logging import SSLLocalLogger
from nnunet_foundation.training.networks import EMATeacher, load_state_dict_flexible, unwrap_network
from nnunet_foundation.training.settings import (SettingsError, comparable_settings, record_or_check_settings,
                                                 resolve_settings)
from nnunet_foundation.training.unlabeled_stream import (UnlabeledDataLoader, describe_transforms, split_batch_size,
                                                         split_training_transforms)
from nnunet_foundation.training.views import (REFERENCE_STRENGTH, StrongViewStrength, feature_dropout_stream,
                                              strong_views)
from nnunet_foundation.unlabeled import UnlabeledDataError, UnlabeledImageDataset, collect_unlabeled_cases


#: per-epoch log key of ||grad of the weighted unsupervised term|| / ||grad of the supervised term|| (student)
GRAD_RATIO_KEY = "grad_ratio_unsup_sup"


class LossParts(NamedTuple):
    """What ``compute_losses`` returns; the trainer minimises ``supervised + unsupervised``.

    ``supervised``: the terms learned from ground-truth labels (nnU-Net's loss of every trained network);
    ``unsupervised``: every semi-supervised term, *already multiplied by its weight* (consistency, pseudo-labels,
    co-training, foundation-model guidance), so that the sum is the loss; ``logs``: the scalars of ``ssl_log_keys``.
    The two are kept apart so that the base can measure the ratio of their gradients on the student.
    """
    supervised: torch.Tensor
    unsupervised: torch.Tensor
    logs: Dict[str, float]

    @property
    def total(self) -> torch.Tensor:
        return self.supervised + self.unsupervised


def rampup(progress: float, length: float = 1.0, shape: str = "exp") -> float:
    """Weight ramp-up in [0, 1] as a function of training progress t/T.

    ``exp``: exp(-5 (1 - min(t/(length T), 1))^2), the Laine & Aila / SSL4MIS sigmoid ramp-up expressed in training
    progress rather than iterations (nnU-Net's 250k default iterations make papers' iteration counts meaningless).
    """
    if shape == "none" or length <= 0:
        return 1.0
    x = min(max(progress / length, 0.0), 1.0)
    if shape == "exp":
        return float(math.exp(-5.0 * (1.0 - x) ** 2))
    if shape == "linear":
        return x
    raise SettingsError(f"unknown ramp-up shape '{shape}' (use exp, linear or none)")


class nnUNetTrainerSemiSupervised(nnUNetTrainer):
    """Base class of this package's semi-supervised trainers (not a method by itself)."""

    #: settings shared by all methods; subclasses extend with ``{**base.default_settings, ...}``
    default_settings: Dict = {
        # global unlabeled batch size (split over GPUs like nnU-Net's batch); 0 = same as the labeled batch size
        "unlabeled_batch_size": 0,
        # maximum weight of the unsupervised term and the shape/length of its ramp-up over training progress
        "unsup_weight": 0.1,
        "rampup_shape": "exp",
        "rampup_length": 1.0,
    }
    #: scalars each method logs per epoch (mean over iterations); they appear in progress.png's fourth panel
    ssl_log_keys: Tuple[str, ...] = ("unsup_loss", "unsup_weight")
    #: N > 0: the unlabeled stream gives the weak view ('data': geometric transforms only) and the base adds
    #: 'strong': N strong photometric views of it (training/views.py); 0: 'data' has all of nnU-Net's transforms
    num_strong_views: int = 0
    #: what ``network_weights`` holds (``inference_network``), in words for reports (the benchmark's)
    exported_model: str = "student"
    #: the checkpoint also holds a SAM this trainer fine-tuned (SynFoC, SC-SAM): predict-sam-student segments with
    #: it, and the benchmark scores it as a row of its own beside the run's nnU-Net
    cotrained_sam: bool = False
    #: the random ranges of those strong views (training/views.py); SynFoC uses its reference's
    strong_view_strength: StrongViewStrength = REFERENCE_STRENGTH

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.resuming = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        mro_names = [c.__name__ for c in type(self).__mro__]
        not_used = {}
        self.ssl_settings = resolve_settings(self.default_settings, mro_names, not_used=not_used)
        for name, where in sorted(not_used.items()):  # settings of other trainers in the same shell / config file
            self.print_to_log_file(f"Setting '{name}' ({where}) belongs to other trainers of this package; "
                                   f"not used by {mro_names[0]}.")
        self.logger.local_logger = SSLLocalLogger(self.ssl_log_keys, ratio_keys=(GRAD_RATIO_KEY,))
        self.ssl_iteration = 0  # optimiser steps taken so far, across epochs and resumptions
        self.dataloader_unlabeled = None
        self.unlabeled_batch_size = None
        # models registered by build_ssl_modules, by checkpoint key (see add_ema_teacher / build_extra_network)
        self.ema_teachers: Dict[str, EMATeacher] = {}
        self.extra_networks: Dict[str, nn.Module] = {}
        self._trained_modules: List[Tuple[torch.optim.Optimizer, nn.Module]] = []
        self._ssl_state_restored = False
        self._grad_clip_norm = 12  # nnU-Net's value
        self._grad_ratio_due = False  # measure the gradient-norm ratio at the next step (the first of each epoch)
        self._epoch_grad_ratio = math.nan

    # ------------------------------------------------------------------------------------------------ hooks
    def build_ssl_modules(self) -> None:
        """Create and register extra models. Called at the end of ``initialize()``."""

    def sync_ssl_modules_with_network(self) -> None:
        """Called at train start when no checkpoint was restored, after ``-pretrained_weights`` were loaded into the
        network (nnU-Net loads them after ``initialize()``): every EMA teacher starts as a copy of its student."""
        for ema in self.ema_teachers.values():
            ema.copy_student()

    def compute_losses(self, labeled: dict, unlabeled: dict) -> LossParts:
        """Return ``LossParts(supervised, weighted unsupervised, scalars to log)``. ``labeled``: {'data', 'target'}
        on the device; ``unlabeled``: {'data', and with ``num_strong_views`` 'strong': a list of strong views} on
        the device. Runs under autocast on CUDA."""
        raise NotImplementedError(f"{type(self).__name__} is the semi-supervised base class; train one of its "
                                  f"methods instead, e.g. nnUNetTrainerMeanTeacher or nnUNetTrainerCPS.")

    def after_optimizer_step(self) -> None:
        """Runs after the EMA teachers were updated. ``self.ssl_iteration`` is the index of the step just taken."""

    def ssl_state_dict(self) -> dict:
        """The registered EMA teachers and extra networks under their checkpoint keys; methods add their own."""
        return {**{key: ema.state_dict() for key, ema in self.ema_teachers.items()},
                **{key: unwrap_network(net).state_dict() for key, net in self.extra_networks.items()}}

    def load_ssl_state_dict(self, state: dict) -> None:
        for key, ema in self.ema_teachers.items():
            ema.load_state_dict(state[key])
        for key, net in self.extra_networks.items():
            unwrap_network(net).load_state_dict(state[key])

    def inference_network(self) -> nn.Module:
        """The network whose weights go into ``network_weights`` (what ``nnUNetv2_predict`` loads) and that
        nnU-Net's validation uses. Default: the trained network itself."""
        return self.network

    # ------------------------------------------------------------------------------------- model registry
    def add_ema_teacher(self, checkpoint_key: str, student: nn.Module, decay: float,
                        trainable_only: bool = False) -> nn.Module:
        """Register an EMA teacher of ``student`` and return the teacher module. The base updates it after every
        optimiser step (with Mean Teacher's warm-up), starts it from the student (after ``-pretrained_weights``)
        and keeps it in the checkpoint under ``checkpoint_key``. ``trainable_only``: see :class:`EMATeacher`."""
        ema = EMATeacher(student, decay, trainable_only)
        self.ema_teachers[checkpoint_key] = ema
        return ema.module

    def build_extra_network(self, checkpoint_key: str) -> Tuple[nn.Module, torch.optim.Optimizer]:
        """(network, optimiser): another network of nnU-Net's planned architecture, set up as nnU-Net sets up
        ``self.network``: built by ``build_network_architecture``, compiled when nnU-Net compiles, its optimiser from
        ``configure_optimizers`` (so a trainer variant that changes the optimiser changes it for this network too),
        SyncBatchNorm + DDP under DDP. It is stepped with the main network, follows its learning rate, switches
        deep supervision with it, and is checkpointed under ``checkpoint_key``; its weights are initialised afresh
        (differently from ``self.network``)."""
        network = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            network = torch.compile(network)
        main_network, self.network = self.network, network  # configure_optimizers reads self.network
        try:
            optimizer, _ = self.configure_optimizers()  # the scheduler is not needed: on_train_epoch_start copies lr
        finally:
            self.network = main_network
        if self.is_ddp:
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
            network = DDP(network, device_ids=[self.local_rank])
        self.extra_networks[checkpoint_key] = network
        self.add_trained_module(network, optimizer)
        return network, optimizer

    def add_trained_module(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Train ``module`` with ``optimizer`` beside the main network: same loss backward, AMP, clipping and step,
        ``.train()`` at every epoch start, learning rate = nnU-Net's current lr x each group's ``lr_scale``
        (default 1), optimiser state in the checkpoint."""
        self._trained_modules.append((optimizer, module))

    def offline_pseudo_labels(self, unlabeled_cases: List[str]):
        """``case -> pseudo-label map`` read with the unlabeled crops (``batch['pseudo_label']``), or None. A method
        that learns from an offline pseudo-label cache (``nnunet-foundation pseudo-label``) returns its reader
        (:meth:`open_pseudo_label_cache`)."""
        return None

    def open_pseudo_label_cache(self, unlabeled_cases: List[str]):
        """The reader of the offline cache named by the setting ``pseudo_labels``, checked against these plans and
        cases (errors name the command that makes or completes it)."""
        from nnunet_foundation.pseudo_labels import open_cache

        return open_cache(self.ssl_settings["pseudo_labels"], self.preprocessed_dataset_folder_base,
                          self.plans_manager.plans, self.configuration_name, unlabeled_cases)

    def extra_optimizers(self) -> List[Tuple[torch.optim.Optimizer, nn.Module]]:
        """The registered (optimiser, module) pairs stepped together with nnU-Net's own optimiser."""
        return list(self._trained_modules)

    # --------------------------------------------------------------------------------- student helpers
    def forward_labeled_and_unlabeled(self, x_labeled: torch.Tensor, x_unlabeled: torch.Tensor,
                                      network: Optional[nn.Module] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """One pass of ``network`` (default: the student) over labeled and unlabeled patches together - nnU-Net's
        InstanceNorm is per sample, so this equals two passes and is cheaper - split back into (labeled outputs,
        unlabeled outputs), each a list over deep-supervision scales."""
        outputs = self.as_list((network or self.network)(torch.cat((x_labeled, x_unlabeled))))
        n = x_labeled.shape[0]
        return [o[:n] for o in outputs], [o[n:] for o in outputs]

    def forward_with_feature_dropout(self, x_labeled: torch.Tensor, x_unlabeled: torch.Tensor, p: float = 0.5,
                                     network: Optional[nn.Module] = None):
        """:meth:`forward_labeled_and_unlabeled` plus a feature-perturbed stream of the unlabeled patches (UniMatch):
        (labeled outputs, unlabeled outputs, unlabeled outputs decoded from encoder features with channel dropout
        ``p``), one encoder pass for all three (training/views.py ``feature_dropout_stream``)."""
        n = x_labeled.shape[0]
        clean, perturbed = feature_dropout_stream(network or self.network, torch.cat((x_labeled, x_unlabeled)), p,
                                                  first=n)
        return [o[:n] for o in clean], [o[n:] for o in clean], perturbed

    def supervised_loss(self, outputs_labeled: List[torch.Tensor], target) -> torch.Tensor:
        """nnU-Net's own loss (with its deep-supervision weights) on the labeled outputs of one network."""
        return self.loss(outputs_labeled if self.enable_deep_supervision else outputs_labeled[0], target)

    # ----------------------------------------------------------------------------------------- schedule
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    @property
    def progress(self) -> float:
        """Training progress t/T in [0, 1]."""
        return min(self.ssl_iteration / max(self.total_iterations, 1), 1.0)

    def unsup_weight(self) -> float:
        s = self.ssl_settings
        return s["unsup_weight"] * rampup(self.progress, s["rampup_length"], s["rampup_shape"])

    def deep_supervision_weights(self) -> Tuple[float, ...]:
        """nnU-Net's per-scale loss weights (highest resolution first), reused for the unsupervised terms."""
        return tuple(self.loss.weight_factors) if self.enable_deep_supervision else (1.0,)

    def as_list(self, output) -> List[torch.Tensor]:
        return list(output) if isinstance(output, (list, tuple)) else [output]

    # ------------------------------------------------------------------------------------------- set-up
    def initialize(self):
        if self.label_manager.has_regions:
            raise NotImplementedError(
                f"{type(self).__name__}: region-based training (dataset.json 'regions_class_order') uses sigmoid "
                f"outputs; the semi-supervised losses here are defined for softmax outputs. Train with labels "
                f"instead of regions.")
        if self.is_cascaded:
            raise NotImplementedError(f"{type(self).__name__}: cascade stages need previous-stage predictions for "
                                      f"the unlabeled scans, which nnU-Net does not produce. Use 3d_fullres or 2d.")
        super().initialize()
        self.build_ssl_modules()
        self.logger.update_config({"ssl_settings": self.ssl_settings})

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        global_unlabeled = self.ssl_settings["unlabeled_batch_size"] or self.configuration_manager.batch_size
        world, rank = (dist.get_world_size(), dist.get_rank()) if self.is_ddp else (1, 0)
        self.unlabeled_batch_size = split_batch_size(global_unlabeled, world, rank)

    def _fold_split_entry(self) -> dict:
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold == "all" or not isfile(splits_file):
            return {}
        splits = load_json(splits_file)
        return splits[self.fold] if self.fold < len(splits) else {}

    def get_unlabeled_dataset(self, labeled_keys: List[str]) -> UnlabeledImageDataset:
        split_unlabeled = self._fold_split_entry().get("unlabeled", [])
        cases = collect_unlabeled_cases(self.preprocessed_dataset_folder_base, self.preprocessed_dataset_folder,
                                        self.configuration_manager.data_identifier, self.plans_manager.plans,
                                        self.configuration_name, split_unlabeled, labeled_keys)
        if not cases:
            raise UnlabeledDataError(
                f"{type(self).__name__} needs unlabeled data but none was found for "
                f"{self.plans_manager.dataset_name}, configuration {self.configuration_name}, fold {self.fold}. "
                f"Either put scans into nnUNet_raw/{self.plans_manager.dataset_name}/imagesUnlabeled and run "
                f"'nnunet-foundation preprocess-unlabeled -d {self.plans_manager.dataset_name} -c "
                f"{self.configuration_name}', or write a label-scarcity split with an 'unlabeled' list "
                f"('nnunet-foundation make-splits').")
        return UnlabeledImageDataset(cases)

    def get_dataloaders(self):
        # unlabeled data first: a missing unlabeled set should fail before any worker starts
        tr_keys, val_keys = self.do_split()
        dataset_u = self.get_unlabeled_dataset(list(tr_keys) + list(val_keys))
        dl_train, dl_val = super().get_dataloaders()

        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        full = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        image_only, weak = split_training_transforms(full)
        transforms = weak if self.num_strong_views else image_only
        self.print_to_log_file(
            f"Unlabeled stream: {len(dataset_u)} case(s), batch size {self.unlabeled_batch_size} per process, "
            f"uniform random crops, transforms {describe_transforms(transforms)}"
            + (f", {self.num_strong_views} strong view(s) made on the device" if self.num_strong_views else ""))
        dl_u = UnlabeledDataLoader(dataset_u, self.unlabeled_batch_size, initial_patch_size, patch_size,
                                   self.label_manager, transforms=transforms,
                                   pseudo_labels=self.offline_pseudo_labels(dataset_u.identifiers))
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            self.dataloader_unlabeled = SingleThreadedAugmenter(dl_u, None)
        else:
            # as many workers as the labeled stream, so the unlabeled stream never starves the GPU
            self.dataloader_unlabeled = NonDetMultiThreadedAugmenter(
                data_loader=dl_u, transform=None, num_processes=n_proc, num_cached=max(6, n_proc // 2),
                seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(self.dataloader_unlabeled)
        return dl_train, dl_val

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if not self._ssl_state_restored:
            self.sync_ssl_modules_with_network()
        if self.local_rank == 0 and self.resuming:  # --c: refuse changed settings before any work is done
            record_or_check_settings(self.output_folder, self.ssl_settings, type(self).__name__, resuming=True,
                                     defaults=self.default_settings)
        super().on_train_start()
        # a new run records its settings only once it has really started (data found, loaders running): a start
        # that fails must not overwrite the record of the run whose checkpoints are in this folder
        if self.local_rank == 0:
            if not self.resuming:
                record_or_check_settings(self.output_folder, self.ssl_settings, type(self).__name__, resuming=False)
            self.print_to_log_file("Semi-supervised settings: " + json.dumps(self.ssl_settings, sort_keys=True))

    def on_train_end(self):
        super().on_train_end()
        finish = getattr(self.dataloader_unlabeled, "_finish", None)
        if finish is not None:
            finish()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # self.network.train()
        self._grad_ratio_due, self._epoch_grad_ratio = True, math.nan
        for opt, module in self.extra_optimizers():
            module.train()
            # same schedule as nnU-Net's optimiser
            for group in opt.param_groups:
                group["lr"] = self.optimizer.param_groups[0]["lr"] * group.get("lr_scale", 1.0)

    # --------------------------------------------------------------------------------------------- step
    def _to_device(self, x):
        if isinstance(x, (list, tuple)):
            return [i.to(self.device, non_blocking=True) for i in x]
        return x.to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict:
        unlabeled_batch = next(self.dataloader_unlabeled)
        labeled = {"data": self._to_device(batch["data"]), "target": self._to_device(batch["target"])}
        unlabeled = {"data": self._to_device(unlabeled_batch["data"])}
        if "pseudo_label" in unlabeled_batch:
            unlabeled["pseudo_label"] = self._to_device(unlabeled_batch["pseudo_label"])
        if self.num_strong_views:
            with torch.no_grad():
                unlabeled["strong"] = strong_views(unlabeled["data"], self.num_strong_views, self.strong_view_strength)

        pairs = [(self.optimizer, self.network)] + self.extra_optimizers()
        for opt, _ in pairs:
            opt.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            parts = self.compute_losses(labeled, unlabeled)
        loss, logs = parts.total, parts.logs
        if self._grad_ratio_due:
            self._grad_ratio_due = False
            self._epoch_grad_ratio = self.gradient_norm_ratio(parts)

        # one GradScaler for all optimisers is PyTorch's documented multi-optimiser AMP recipe
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for opt, net in pairs:
                self.grad_scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), self._grad_clip_norm)
            for opt, _ in pairs:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            for opt, net in pairs:
                torch.nn.utils.clip_grad_norm_(net.parameters(), self._grad_clip_norm)
                opt.step()
        for ema in self.ema_teachers.values():
            ema.update(self.ssl_iteration)
        self.after_optimizer_step()
        self.ssl_iteration += 1
        out = {"loss": loss.detach().cpu().numpy()}
        out.update({k: float(v) for k, v in logs.items()})
        return out

    def gradient_norm_ratio(self, parts: LossParts) -> float:
        """||d unsupervised / d theta|| / ||d supervised / d theta|| over all trainable parameters theta of the
        student (``self.network``), on the current batch, with the weight of the unsupervised term included.

        All parameters rather than a subset such as the last decoder stages: the supervised gradient needs a backward
        through the whole network anyway, and this runs on one batch per epoch, so the two extra backward passes
        cost well under 1% of training. ``torch.autograd.grad`` returns the gradients without accumulating them
        into ``.grad``, so the step's own backward is unaffected, and DDP's reducer (which hooks gradient
        accumulation) does not all-reduce them: each process measures its own batch and the epoch's value is the
        mean over processes. Under AMP both terms are scaled by the GradScaler's factor, which cancels in the ratio,
        so small fp16 gradients do not underflow; an overflow gives NaN. Methods with extra trained modules (CPS's
        second network, SynFoC's SAM) are measured on the student only: that is the network that is exported.
        """
        params = [p for p in self.network.parameters() if p.requires_grad]

        def norm(term) -> float:
            if not (torch.is_tensor(term) and term.requires_grad):
                return 0.0  # a constant term (e.g. a method that skipped its unsupervised term) moves nothing
            scaled = self.grad_scaler.scale(term) if self.grad_scaler is not None else term
            grads = torch.autograd.grad(scaled, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum(((g.float() ** 2).sum() for g in grads if g is not None),
                                        torch.zeros((), device=scaled.device))))

        supervised, unsupervised = norm(parts.supervised), norm(parts.unsupervised)
        ratio = unsupervised / supervised if supervised > 0 else math.nan
        return ratio if math.isfinite(ratio) else math.nan

    def _epoch_mean(self, value: float) -> float:
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, value)
            value = float(np.nanmean(gathered))
        return value

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        for key in self.ssl_log_keys:
            values = [o[key] for o in train_outputs if key in o]
            self.logger.log(key, self._epoch_mean(float(np.mean(values)) if values else math.nan), self.current_epoch)
        # measured on one batch (not in train_outputs: nnU-Net collates the keys of the first output from all)
        self.logger.log(GRAD_RATIO_KEY, self._epoch_mean(self._epoch_grad_ratio), self.current_epoch)
        summary = ", ".join(f"{k} {self.logger.get_value(k, step=-1):.4g}"
                            for k in (*self.ssl_log_keys, GRAD_RATIO_KEY))
        self.print_to_log_file(f"semi-supervised: {summary} (t/T {self.progress:.3f})")

    # ------------------------------------------------------------------------------ inference network
    @contextlib.contextmanager
    def _inference_network_in_place(self):
        """Temporarily make ``self.network`` the inference network so nnU-Net's validation code evaluates it."""
        target = self.inference_network()
        if target is self.network:
            yield
            return
        student = self.network
        self.network = target
        try:
            yield
        finally:
            self.network = student

    def set_deep_supervision_enabled(self, enabled: bool):
        # works for DDP/compiled students and for unwrapped teachers alike; extra nnU-Net networks follow
        for network in (self.network, *self.extra_networks.values()):
            unwrap_network(network).decoder.deep_supervision = enabled

    def validation_step(self, batch: dict) -> dict:
        with self._inference_network_in_place():
            self.network.eval()
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self._inference_network_in_place():
            super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        student = unwrap_network(self.network)
        inference = unwrap_network(self.inference_network())
        ssl_state = {
            "trainer": type(self).__name__,
            "iteration": self.ssl_iteration,
            "settings": self.ssl_settings,
            # network_weights holds the inference model; the trained network is kept here when it differs
            "student_weights": student.state_dict() if inference is not student else None,
            "extra_optimizer_states": [opt.state_dict() for opt, _ in self.extra_optimizers()],
            **self.ssl_state_dict(),
        }
        checkpoint = {
            "network_weights": inference.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "ssl_state": ssl_state,
        }
        # temporary file + rename: a kill while writing leaves the previous checkpoint intact
        save_checkpoint_atomically(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            # --c (self.resuming) may continue from the next readable checkpoint; --val and others name the file
            checkpoint, source = read_checkpoint_for_resume(filename_or_checkpoint, self.device,
                                                            allow_fallback=self.resuming, log=self.print_to_log_file)
        else:
            checkpoint, source = filename_or_checkpoint, "<checkpoint dict>"
        ssl_state = checkpoint.get("ssl_state")
        if ssl_state is None:
            raise RuntimeError(
                f"{source} was not written by a semi-supervised trainer of nnunet-foundation (no 'ssl_state'), so "
                f"{type(self).__name__} cannot resume from it. To start from its weights use "
                f"'nnUNetv2_train ... -pretrained_weights {source}' instead of --c.")
        old = comparable_settings(ssl_state.get("settings", {}), self.default_settings)
        new = comparable_settings(self.ssl_settings)
        if old != new:
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise SettingsError(f"Refusing to resume from {source}: semi-supervised settings changed "
                                f"(recorded, now): {diff}. Restore them or start a new run without --c.")
        weights = ssl_state["student_weights"] if ssl_state.get("student_weights") is not None \
            else checkpoint["network_weights"]
        load_state_dict_flexible(self.network, weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        for (opt, _), state in zip(self.extra_optimizers(), ssl_state.get("extra_optimizer_states", [])):
            opt.load_state_dict(state)
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.ssl_iteration = int(ssl_state["iteration"])
        self.load_ssl_state_dict(ssl_state)
        self._ssl_state_restored = True
        # nnU-Net's --c silently picks checkpoint_final, _latest or _best; say which one and where it continues
        self.print_to_log_file(f"Resumed from {source}: epoch {self.current_epoch}, semi-supervised iteration "
                               f"{self.ssl_iteration}")
