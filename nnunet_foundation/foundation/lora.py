"""Adapting a SAM generalist: LoRA on the image encoder, a trainable decoder, a prompt-free multi-class head.

Everything here is switched on by :class:`~nnunet_foundation.foundation.config.GeneralistConfig` and applied by
:func:`make_adaptable`, which ``sam_backend.build_sam_generalist`` calls *after* loading the checkpoint and *before*
``generalist.freeze()``:

``lora_rank > 0`` (with ``lora_alpha``)
    Every image-encoder attention block's fused ``attn.qkv`` Linear (SAM's ViT blocks, LiteMedSAM's TinyViT stages) is
    wrapped in :class:`LoRAQKV`, which adds ``(alpha / rank) * B(A(x))`` to its query and value outputs (the keys are
    untouched), as in SAMed / SynFoC. ``B`` starts at zero, so a freshly adapted model computes exactly the function of the checkpoint.
``train_decoder``
    The prompt encoder and the mask decoder become trainable.
``multiclass_head`` (with ``num_classes``, background included)
    ``generalist.multiclass_head`` becomes a :class:`MultiClassMaskHead`: a second SAM ``MaskDecoder`` with one
    output per class, fed with the prompt encoder's "no prompt" embeddings, initialised from the pretrained decoder.
    Trainers call ``generalist.multiclass_head.segment(generalist, slices)`` or
    ``generalist.multiclass_head.segment_patches(generalist, images)``; the prompted ``generalist(...)`` forward does
    not use it.

After :func:`make_adaptable` and ``freeze()`` exactly these parameters require gradients; the image encoder's own
weights (patch embedding, attention, MLPs, neck, and the wrapped qkv ``base``) stay frozen, and
``generalist.train()`` switches only the adapted modules to training mode.

State-dict names (relative to the generalist)::

    sam.image_encoder.blocks.<i>.attn.qkv.base.weight / .base.bias      frozen, the checkpoint's qkv Linear
    sam.image_encoder.blocks.<i>.attn.qkv.lora_a_q.weight              (rank, dim)  trainable
    sam.image_encoder.blocks.<i>.attn.qkv.lora_b_q.weight              (dim, rank)  trainable
    sam.image_encoder.blocks.<i>.attn.qkv.lora_a_v.weight / lora_b_v.weight
    sam.prompt_encoder.* / sam.mask_decoder.*                          trainable with train_decoder
    multiclass_head.decoder.*                                          trainable with multiclass_head

A trainer saves :func:`adaptable_state_dict` (the trainable parameters only) in its checkpoint and restores it with
:func:`load_adaptable_state_dict` into a generalist built from the same configuration; the frozen backbone always
comes from the SAM checkpoint file. :func:`trainable_parameter_groups` gives AdamW groups (SynFoC: lr 1e-4,
weight decay 0.1) without weight decay on biases and normalisation weights.

The random initialisation of the LoRA ``A`` matrices and of the head's new outputs is seeded with ``config.seed``
(without touching the global RNG), so two generalists built from the same configuration are identical.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_foundation.foundation.sam_decoding import decode_masks

__all__ = ["LoRAQKV", "apply_lora", "MultiClassMaskHead", "make_adaptable", "adaptable_state_dict",
           "load_adaptable_state_dict", "trainable_parameter_groups"]


# ------------------------------------------------------------------------------------------------------------ LoRA
class LoRAQKV(nn.Module):
    """A frozen fused ``qkv`` Linear plus low-rank updates of its query and value outputs::

        q = base_q(x) + (alpha / rank) * lora_b_q(lora_a_q(x))
        k = base_k(x)
        v = base_v(x) + (alpha / rank) * lora_b_v(lora_a_v(x))

    Which outputs of the fused Linear are q and v depends on the attention implementation: SAM's ViT orders them
    in thirds (all q, all k, all v; the default), TinyViT (LiteMedSAM) per head (q, k, v of head 0, then head 1,
    ...); ``q_index`` / ``v_index`` give them (see :func:`qkv_output_layout`).

    ``lora_a_*`` are initialised like ``nn.Linear`` (Kaiming uniform), ``lora_b_*`` with zeros, so the wrapped module
    initially returns exactly ``base(x)``. The wrapped Linear stays reachable as ``self.base`` (state-dict keys
    ``base.weight`` / ``base.bias``) and is kept in eval mode by :meth:`train`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0, q_index: Optional[torch.Tensor] = None,
                 v_index: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAQKV wraps an nn.Linear, got {type(base).__name__}")
        if (q_index is None) != (v_index is None):
            raise ValueError("give both q_index and v_index, or neither (SAM's q/k/v thirds)")
        if q_index is None:
            if base.out_features % 3 != 0:
                raise ValueError(f"a fused qkv Linear has 3 * dim outputs, got {base.out_features}")
            dim = base.out_features // 3
            q_index, v_index = torch.arange(dim), torch.arange(2 * dim, 3 * dim)
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        # not persistent: the layout is a property of the architecture, not state to save
        self.register_buffer("q_index", torch.as_tensor(q_index, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.register_buffer("v_index", torch.as_tensor(v_index, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        kwargs = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a_q = nn.Linear(base.in_features, self.rank, bias=False, **kwargs)
        self.lora_b_q = nn.Linear(self.rank, len(self.q_index), bias=False, **kwargs)
        self.lora_a_v = nn.Linear(base.in_features, self.rank, bias=False, **kwargs)
        self.lora_b_v = nn.Linear(self.rank, len(self.v_index), bias=False, **kwargs)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: ``nn.Linear``'s default (Kaiming uniform, a = sqrt(5)); B: zeros (the update starts at 0)."""
        for a in (self.lora_a_q, self.lora_a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_b_q, self.lora_b_v):
            nn.init.zeros_(b.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta_q = self.scaling * self.lora_b_q(self.lora_a_q(x))
        delta_v = self.scaling * self.lora_b_v(self.lora_a_v(x))
        return out.index_add(-1, self.q_index, delta_q.to(out.dtype)).index_add(-1, self.v_index,
                                                                                delta_v.to(out.dtype))

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.train(False)  # the frozen projection never switches to training mode
        return self

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def qkv_output_layout(attention: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(q_index, v_index)`` of an attention module's fused ``qkv`` outputs; ``(None, None)`` for SAM's thirds.

    TinyViT's ``Attention`` (``key_dim``, ``d``, ``num_heads``) views the output as ``(heads, key_dim + key_dim + d)``
    and splits each head's part into q, k, v; SAM's ViT ``Attention`` reshapes to ``(3, heads, head_dim)``.
    """
    if all(hasattr(attention, a) for a in ("key_dim", "d", "num_heads")):
        per_head = 2 * attention.key_dim + attention.d
        heads = torch.arange(attention.num_heads).unsqueeze(1) * per_head
        q = (heads + torch.arange(attention.key_dim)).flatten()
        v = (heads + 2 * attention.key_dim + torch.arange(attention.d)).flatten()
        return q, v
    return None, None


def attention_modules(image_encoder: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every attention block with a fused ``qkv`` Linear (SAM ViT blocks, TinyViT stages)."""
    return [(n, m) for n, m in image_encoder.named_modules()
            if n.endswith("attn") and isinstance(getattr(m, "qkv", None), (nn.Linear, LoRAQKV))]


def apply_lora(sam: nn.Module, rank: int, alpha: float = 1.0) -> List[str]:
    """Wrap the fused ``attn.qkv`` of every attention block of ``sam.image_encoder`` in a :class:`LoRAQKV`.

    Returns:
        the parameter-name prefixes (relative to ``sam``) of the new trainable parameters, one per block, e.g.
        ``"image_encoder.blocks.<i>.attn.qkv.lora_"`` (SAM) or ``"image_encoder.layers.<s>.blocks.<i>.attn.qkv.lora_"``
        (TinyViT); every parameter whose name starts with one is a LoRA matrix.
    Raises:
        ValueError: ``rank < 1`` or LoRA was already applied.
    """
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    blocks = attention_modules(sam.image_encoder)
    if not blocks:
        raise TypeError("apply_lora expects an image encoder with attention blocks that have a fused qkv Linear "
                        "(SAM ViT, TinyViT)")
    prefixes = []
    for name, attention in blocks:
        if isinstance(attention.qkv, LoRAQKV):
            raise ValueError(f"LoRA is already applied to image_encoder.{name}.qkv")
        q_index, v_index = qkv_output_layout(attention)
        attention.qkv = LoRAQKV(attention.qkv, rank, alpha, q_index, v_index)
        prefixes.append(f"image_encoder.{name}.qkv.lora_")
    return prefixes


# -------------------------------------------------------------------------------------------- multi-class head
class MultiClassMaskHead(nn.Module):
    """Prompt-free multi-class decoder (SAMed / SynFoC style).

    ``self.decoder`` is a SAM ``MaskDecoder`` (the class of the model's own decoder) with ``num_multimask_outputs = num_classes``
    (so ``num_classes + 1`` mask tokens) and the transformer, upscaling and IoU-head sizes of the model's decoder.
    Every parameter whose name and shape match the pretrained decoder starts from its weights (the whole
    transformer, ``iou_token``, ``output_upscaling``, the first ``min(4, num_classes + 1)`` hypernetwork MLPs, the
    IoU head's hidden layers; ``mask_tokens`` and the IoU head's last layer only when ``num_classes == 3``); the
    rest keeps its random ``nn.Module`` initialisation. :attr:`pretrained_keys` / :attr:`random_keys` list both.

    Output channel ``c`` (class ``c``, 0 = background) is the decoder's multimask output ``c + 1``, i.e. mask token
    ``c + 1``; output 0 (SAM's single-mask token) is not used, as ``MaskDecoder.forward(multimask_output=True)``.
    """

    def __init__(self, mask_decoder: nn.Module, num_classes: int):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"a multi-class head needs num_classes >= 2 (including background), got {num_classes}")
        self.num_classes = int(num_classes)
        pretrained = mask_decoder
        iou_head = pretrained.iou_prediction_head
        activation = type(pretrained.output_upscaling[2])
        # the decoder's own class: segment_anything's, or the copy LiteMedSAM's package ships
        self.decoder = type(pretrained)(
            transformer_dim=pretrained.transformer_dim,
            transformer=copy.deepcopy(pretrained.transformer),
            num_multimask_outputs=self.num_classes,
            activation=activation,
            iou_head_depth=iou_head.num_layers,
            iou_head_hidden_dim=iou_head.layers[0].out_features,
        )
        source = pretrained.state_dict()
        own = self.decoder.state_dict()
        matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        self.decoder.load_state_dict(matching, strict=False)
        self.pretrained_keys = sorted(matching)
        self.random_keys = sorted(set(own) - set(matching))
        reference = next(pretrained.parameters())
        self.decoder.to(device=reference.device, dtype=reference.dtype)

    def forward(self, image_embeddings: torch.Tensor, prompt_encoder: nn.Module, return_iou: bool = False):
        """``(P, C, h, w)`` image embeddings -> ``(P, num_classes, 4h, 4w)`` per-class logits (low resolution).

        ``prompt_encoder`` (the model's, not owned by the head) supplies the dense positional encoding and the
        "no prompt" embeddings: sparse ``(P, 0, C)``, dense ``no_mask_embed`` broadcast to ``(P, C, h, w)``.
        With ``return_iou`` also the ``(P, num_classes)`` predicted quality of each class map.
        """
        p = image_embeddings.shape[0]
        sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
        sparse = sparse.expand(p, -1, -1)
        dense = dense.expand(p, -1, -1, -1)
        masks, iou = decode_masks(self.decoder, image_embeddings, prompt_encoder.get_dense_pe(), sparse, dense)
        masks, iou = masks[:, 1:1 + self.num_classes], iou[:, 1:1 + self.num_classes]
        return (masks, iou) if return_iou else masks

    def _grad_context(self, generalist):
        if generalist.training and generalist.config.trainable:
            return torch.enable_grad()
        return torch.no_grad()

    def segment(self, generalist, slices: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` nnU-Net intensities (or colour slices ``(N, 3, h, w)``) -> ``(N, num_classes, h, w)``
        logits at slice resolution.

        Uses the generalist's intensity mapping and resize (``_to_model_input``), its image encoder (with LoRA) and
        its prompt encoder. Runs with gradients (to the LoRA, head and, with ``train_decoder``, prompt-encoder
        parameters) when the generalist is in training mode, under ``no_grad`` otherwise, as the prompted forward.
        """
        from nnunet_foundation.foundation.geometry import resize_from_model, upsample_low_res

        if not (slices.ndim == 3 or (slices.ndim == 4 and slices.shape[1] == 3)):
            raise ValueError(f"expected slices (N, h, w) or colour slices (N, 3, h, w), got shape "
                             f"{tuple(slices.shape)}")
        with self._grad_context(generalist):
            model_inputs, geometry = generalist._to_model_input(slices.to(generalist.device))
            embeddings = generalist.encode(model_inputs)
            with generalist._autocast():
                low_res = self(embeddings, generalist.sam.prompt_encoder)
            return resize_from_model(upsample_low_res(low_res.float(), generalist.img_size), geometry)

    def segment_patches(self, generalist, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, [D,] H, W)`` patches -> ``(B, num_classes, [D,] H, W)`` logits, every slice along the
        generalist's slicing axis (``config.image_channel`` is the input channel, ``"rgb"``: channels 0-2 as one
        colour image)."""
        from nnunet_foundation.foundation.config import RGB
        from nnunet_foundation.foundation.geometry import patch_to_slices, slices_to_patch

        if images.ndim not in (4, 5):
            raise ValueError(f"expected images (B, C, [D,] H, W), got shape {tuple(images.shape)}")
        from nnunet_foundation.foundation.generalist import check_inputs

        channel = generalist.config.image_channel
        check_inputs(images, images[:, :1], channel)  # a channel (or the 3 colour ones) the input has
        x = images[:, :3] if channel == RGB else images[:, int(channel):int(channel) + 1]
        is_2d = images.ndim == 4
        axis = 0 if is_2d else generalist.slice_axis()
        x = x.unsqueeze(2) if is_2d else patch_to_slices(x, axis)  # (B, C', S, h, w)
        b, c, s, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * s, c, h, w)  # slice-major
        logits = self.segment(generalist, slices if c == 3 else slices[:, 0])  # (B*S, K, h, w)
        logits = logits.reshape(b, s, self.num_classes, h, w).transpose(1, 2)  # (B, K, S, h, w)
        return logits[:, :, 0] if is_2d else slices_to_patch(logits, axis)


# --------------------------------------------------------------------------------------------- making adaptable
def make_adaptable(generalist) -> List[str]:
    """Apply what ``generalist.config`` asks for (LoRA, trainable decoder, multi-class head) to a SAM generalist.

    Records the trainable parameter-name prefixes and modules in ``generalist._adaptable_prefixes`` and
    ``_adaptable_module_names``, which ``Generalist.freeze()`` and ``Generalist.train()`` consult. Call it once, before
    ``freeze()``; ``build_sam_generalist`` does. Returns the trainable parameter-name prefixes.
    """
    config = generalist.config
    if generalist._adaptable_prefixes or generalist._adaptable_module_names:
        raise ValueError("make_adaptable was already applied to this generalist")
    sam = generalist.sam
    prefixes: List[str] = []
    module_names: List[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.seed))
        if config.lora_rank > 0:
            lora_prefixes = apply_lora(sam, config.lora_rank, config.lora_alpha)
            prefixes += [f"sam.{p}" for p in lora_prefixes]
            module_names += [f"sam.{p[:-len('.lora_')]}" for p in lora_prefixes]
        if config.train_decoder:
            prefixes += ["sam.prompt_encoder.", "sam.mask_decoder."]
            module_names += ["sam.prompt_encoder", "sam.mask_decoder"]
        if config.multiclass_head:
            if config.num_classes is None or config.num_classes < 2:
                raise ValueError("multiclass_head needs num_classes (including background, >= 2)")
            generalist.multiclass_head = MultiClassMaskHead(sam.mask_decoder, config.num_classes)
            prefixes.append("multiclass_head.")
            module_names.append("multiclass_head")
    generalist._adaptable_prefixes = tuple(prefixes)
    generalist._adaptable_module_names = tuple(module_names)
    return list(prefixes)


# ------------------------------------------------------------------------------------------------- checkpoints
def _adaptable_names(generalist) -> List[str]:
    return [n for n, _ in generalist.named_parameters() if generalist.is_trainable_parameter(n)]


def adaptable_state_dict(generalist) -> "OrderedDict[str, torch.Tensor]":
    """The trainable (adapted) parameters only, detached, under their names in ``generalist.state_dict()``.

    This is what a trainer stores in its checkpoint; empty for a generalist without adaptation.
    """
    params = dict(generalist.named_parameters())
    return OrderedDict((n, params[n].detach()) for n in _adaptable_names(generalist))


def _name_list(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_adaptable_state_dict(generalist, state: Mapping[str, torch.Tensor]) -> None:
    """Restore :func:`adaptable_state_dict` output into a generalist built with the same configuration.

    Strict: a missing or unexpected key, or a shape mismatch, raises ``ValueError`` naming the keys (the generalist
    was probably built with another lora_rank, train_decoder, multiclass_head or num_classes than the saved one).
    Parameters are copied in place, so optimizers holding them stay valid.
    """
    params = dict(generalist.named_parameters())
    expected = set(_adaptable_names(generalist))
    given = set(state)
    hint = (f"the generalist configuration may have changed since the state was saved (LoRA rank, train_decoder, "
            f"multiclass_head or num_classes); this generalist has lora_rank={generalist.config.lora_rank}, "
            f"train_decoder={generalist.config.train_decoder}, multiclass_head={generalist.config.multiclass_head}, "
            f"num_classes={generalist.config.num_classes}")
    problems = []
    if expected - given:
        problems.append(f"missing keys: {_name_list(expected - given)}")
    if given - expected:
        problems.append(f"unexpected keys: {_name_list(given - expected)}")
    mismatched = [f"{k} (saved {tuple(state[k].shape)}, expected {tuple(params[k].shape)})"
                  for k in sorted(expected & given) if tuple(state[k].shape) != tuple(params[k].shape)]
    if mismatched:
        problems.append(f"shape mismatch: {_name_list(mismatched)}")
    if problems:
        raise ValueError(f"cannot load the adapted generalist parameters: {'; '.join(problems)}. {hint}")
    with torch.no_grad():
        for k in expected:
            params[k].copy_(state[k])


def trainable_parameter_groups(generalist, lr: float = 1e-4, weight_decay: float = 0.1) -> List[Dict]:
    """AdamW parameter groups of the parameters that require gradients: weight decay on weight matrices and
    embeddings, none on biases and normalisation weights (1-D parameters). SynFoC: ``AdamW(lr=1e-4, wd=0.1)``.

    Raises:
        ValueError: nothing is trainable (call after ``freeze()`` on an adapted generalist).
    """
    decay, no_decay = [], []
    for name, p in generalist.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the generalist has no trainable parameters: configure lora_rank, train_decoder or "
                         "multiclass_head")
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups
