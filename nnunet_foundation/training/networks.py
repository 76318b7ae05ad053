"""Network plumbing shared by the semi-supervised trainers: unwrapping, teachers, EMA."""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and/or torch.compile wrappers (in either order)."""
    while True:
        if isinstance(network, DistributedDataParallel):
            network = network.module
        elif isinstance(network, OptimizedModule):
            network = network._orig_mod
        else:
            return network


@contextlib.contextmanager
def captured_encoder_output(network: nn.Module) -> Iterator[dict]:
    """While active, ``store["features"]`` holds the last output of nnU-Net's encoder (the list of skip features,
    bottleneck last) with its graph, so a loss on the features trains the encoder. A forward hook on the unwrapped
    network's ``encoder`` (PlainConvUNet / ResidualEncoderUNet): the network class, DDP and weights stay as they are."""
    store: dict = {}

    def keep(module, inputs, output):
        store["features"] = list(output) if isinstance(output, (list, tuple)) else [output]

    handle = unwrap_network(network).encoder.register_forward_hook(keep)
    try:
        yield store
    finally:
        handle.remove()


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached copy of the unwrapped student that never receives gradients.

    SyncBatchNorm layers (added by nnU-Net for DDP) are turned back into ordinary BatchNorm so the teacher can run
    outside the process group; nnU-Net's default networks use InstanceNorm and are unaffected.
    """
    teacher = copy.deepcopy(unwrap_network(student))
    teacher = _revert_sync_batchnorm(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters; buffers (e.g. BN statistics) are copied."""
    student = unwrap_network(student)
    teacher = unwrap_network(teacher)
    t_params = dict(teacher.named_parameters())
    for name, s in student.named_parameters():
        t_params[name].mul_(decay).add_(s.detach(), alpha=1 - decay)
    t_buffers = dict(teacher.named_buffers())
    for name, b in student.named_buffers():
        t_buffers[name].copy_(b)


def ema_decay_with_warmup(step: int, decay: float) -> float:
    """Mean Teacher's warm-up (Tarvainen & Valpola; SSL4MIS): the teacher follows the student closely early on."""
    return min(1.0 - 1.0 / (step + 1), decay)


class EMATeacher:
    """An exponential moving average of a student network, updated after every optimiser step.

    ``module`` is the teacher: a frozen copy of the unwrapped student. With ``trainable_only`` only the parameters
    that require gradients are averaged and checkpointed (a LoRA-tuned SAM: its frozen backbone is the same in student
    and teacher and never changes); otherwise every parameter is averaged and buffers (BN statistics) are copied.
    The decay follows Mean Teacher's warm-up, ``min(1 - 1/(step + 1), decay)``.
    """

    def __init__(self, student: nn.Module, decay: float, trainable_only: bool = False):
        self.student = student
        self.decay = decay
        self.trainable_only = trainable_only
        self.module = make_teacher(student)
        self.module.eval()
        self._averaged = [n for n, p in unwrap_network(student).named_parameters() if p.requires_grad] \
            if trainable_only else None

    @torch.no_grad()
    def update(self, step: int) -> None:
        """The EMA step after optimiser step ``step`` (0-based, counted over the whole run)."""
        decay = ema_decay_with_warmup(step, self.decay)
        if self._averaged is None:
            ema_update(self.module, self.student, decay)
            return
        student, teacher = dict(unwrap_network(self.student).named_parameters()), dict(self.module.named_parameters())
        for name in self._averaged:
            teacher[name].mul_(decay).add_(student[name].detach(), alpha=1 - decay)

    def copy_student(self) -> None:
        """teacher <- student, e.g. after nnU-Net loaded ``-pretrained_weights`` into the student."""
        student = unwrap_network(self.student).state_dict()
        self.load_state_dict(student if self._averaged is None else {n: student[n] for n in self._averaged})

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The teacher's state for the checkpoint: all of it, or the averaged parameters only."""
        if self._averaged is None:
            return self.module.state_dict()
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().clone() for n in self._averaged}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if self._averaged is None:
            self.module.load_state_dict(state)
            return
        params = dict(self.module.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


def _revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.SyncBatchNorm):
        dims = {2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}
        # SyncBatchNorm does not remember its dimensionality; BatchNorm3d is right for nnU-Net's 3D networks and
        # numerically identical for 2D ones (BatchNorm's math does not depend on the subclass)
        new = dims[4](module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, _revert_sync_batchnorm(child))
    return module


def load_state_dict_flexible(module: nn.Module, state_dict: dict) -> None:
    """Load into the unwrapped module, accepting keys saved from a DDP ('module.') or compiled ('_orig_mod.') model."""
    module = unwrap_network(module)
    own = module.state_dict().keys()
    fixed = {}
    for k, v in state_dict.items():
        key = k
        for prefix in ("module.", "_orig_mod."):
            while key not in own and key.startswith(prefix):
                key = key[len(prefix):]
        fixed[key] = v
    module.load_state_dict(fixed)
