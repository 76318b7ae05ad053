"""Semi-supervised settings: declared per trainer, overridable without editing code, recorded per run.

nnU-Net passes no extra arguments to trainers, so settings come from three layers (later wins):

1. the trainer class's defaults (``default_settings``; class-name variants override them),
2. a JSON file named by the environment variable ``nnUNet_ssl_config`` (keys = setting names; an optional
   per-trainer section ``{"nnUNetTrainerCPS": {...}}`` applies only to that trainer and its subclasses),
3. environment variables ``nnUNet_ssl_<name>``, e.g. ``nnUNet_ssl_unlabeled_batch_size=4``.

The resolved settings are written to ``<output_folder>/ssl_settings.json``. Resuming (``--c``) with settings that
differ from the recorded ones is refused, so that one run never mixes two configurations.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

CONFIG_ENV = "nnUNet_ssl_config"
ENV_PREFIX = "nnUNet_ssl_"
SETTINGS_FILE = "ssl_settings.json"


class SettingsError(ValueError):
    pass


def _convert(name: str, raw: str, default: Any, source: str) -> Any:
    """Parse an environment-variable string into the type of the default."""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "t", "yes", "y"):
                return True
            if raw.lower() in ("0", "false", "f", "no", "n"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, dict)):
            return json.loads(raw)
        if default is None:
            # JSON when it parses (numbers, lists, objects), else the string itself (e.g. the path of a JSON file)
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        return raw
    except (ValueError, json.JSONDecodeError):
        raise SettingsError(f"{source}: cannot read {raw!r} as the {type(default).__name__} that setting "
                            f"'{name}' expects (default {default!r}).") from None


def _check_type(name: str, value: Any, default: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SettingsError(f"{source}: setting '{name}' must be true or false, got {value!r}.")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, type(default)):
        raise SettingsError(f"{source}: setting '{name}' must be a {type(default).__name__} "
                            f"(default {default!r}), got {value!r}.")
    return value


#: allowed values of settings, wherever a trainer declares them: checked when the trainer is built, so a bad value
#: fails before data loading, naming where it came from. ("choice", values), ("range", low, high, what): low <= value
#: <= high, or ("below", low, high, what): low <= value < high; high None = no upper bound.
SETTING_RULES: Dict[str, tuple] = {
    "unlabeled_batch_size": ("range", 0, None, "0 = the labeled batch size"),
    "unsup_weight": ("range", 0.0, None, "the weight of the unsupervised term"),
    "rampup_shape": ("choice", ("exp", "linear", "none")),
    "rampup_length": ("range", 0.0, 1.0, "a fraction of training"),
    "ema_decay": ("below", 0.0, 1.0, "1.0 would freeze the teacher"),
    "confidence_threshold": ("range", 0.0, 1.0, "a probability"),
    "threshold_mode": ("choice", ("fixed", "self_adaptive", "self_adaptive_global")),
    "threshold_ema_decay": ("below", 0.0, 1.0, "1.0 would freeze the thresholds at 1/K"),
    "sam_weight": ("range", 0.0, None, "the weight of the generalist term"),
    "sam_decay": ("range", 0.0, None, "the decay of the generalist weight"),
    "sam_clicks": ("range", 1, None, "clicks per class and slice"),
    "lora_rank": ("range", 0, None, "0 = LoRA off"),
    "sam_lr": ("range", 0.0, None, "a learning rate"),
    "sam_weight_decay": ("range", 0.0, None, "a weight decay"),
    "entropy_weight": ("range", 0.0, None, "the weight of the entropy term"),
    "sam_unsup_weight": ("range", 0.0, None, "the weight of the generalist's unsupervised term"),
    "sam_rampup_length": ("range", 0.0, 1.0, "a fraction of training"),
    "prompt_points": ("range", 1, None, "positive (and as many negative) points per class and slice"),
    "prompt_tokens": ("range", 1, None, "learned prompt tokens per class"),
    "prompt_token_channels": ("range", 0, None, "0 = the prompt embedding's width"),
    "feature_dropout": ("below", 0.0, 1.0, "a dropout probability"),
    "strong_view_weight": ("range", 0.0, None, "the weight of each image-level strong view"),
    "feature_stream_weight": ("range", 0.0, None, "the weight of the feature-perturbation stream"),
    "cutmix_probability": ("range", 0.0, 1.0, "a probability"),
    "cutmix_min_area": ("range", 0.0, 1.0, "a fraction of the patch"),
    "cutmix_max_area": ("range", 0.0, 1.0, "a fraction of the patch"),
}


def check_setting_values(settings: Mapping[str, Any], sources: Mapping[str, str], trainer_name: str) -> None:
    """Refuse values outside :data:`SETTING_RULES`; ``sources`` says where each setting was set."""
    for name, value in settings.items():
        rule = SETTING_RULES.get(name)
        if rule is None or value is None:
            continue
        where = sources.get(name, "default")
        if rule[0] == "choice" and value not in rule[1]:
            raise SettingsError(f"{where}: setting '{name}' of {trainer_name} must be one of {list(rule[1])}, got "
                                f"{value!r}.")
        if rule[0] in ("range", "below"):
            low, high, what = rule[1], rule[2], rule[3]
            below = rule[0] == "below"
            too_high = high is not None and (value >= high if below else value > high)
            if value < low or too_high:
                bounds = f">= {low}" + (f" and {'<' if below else '<='} {high}" if high is not None else "")
                raise SettingsError(f"{where}: setting '{name}' of {trainer_name} must be {bounds} ({what}), got "
                                    f"{value!r}.")


def package_trainer_classes() -> list:
    """Every trainer class of this package that reads package settings (budget variants included): each subclass of
    nnU-Net's trainer defined in ``nnunet_foundation`` with ``default_settings``, whichever base it extends (the
    semi-supervised base, or nnU-Net's trainer directly like WeakMedSAM), after importing every method module so
    that all of them exist."""
    # imported here: the methods import this module
    import importlib
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunet_foundation.methods as methods
    import nnunet_foundation.training.baselines  # noqa: F401  (nnUNetTrainerEMA)

    for module in pkgutil.walk_packages(methods.__path__, methods.__name__ + "."):
        importlib.import_module(module.name)
    classes, seen, pending = [], set(), list(nnUNetTrainer.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls in seen:  # a class deriving from two trainers is reached twice
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("nnunet_foundation.") and hasattr(cls, "default_settings"):
            classes.append(cls)
    return classes


def settings_of_other_trainers(own: Mapping[str, Any]) -> Dict[str, str]:
    """Setting names that another of this package's trainers declares (name -> one such trainer), for names this
    trainer does not know. One shell, config file or benchmark call configures several trainers at once, so a
    setting meant for SemiSAM must not stop Mean Teacher, while a typo must still fail."""
    owners: Dict[str, str] = {}
    for cls in package_trainer_classes():
        for name in getattr(cls, "default_settings", {}):
            if name not in own:
                owners.setdefault(name, cls.__name__)
    return owners


def resolve_settings(defaults: Mapping[str, Any], trainer_mro_names: list, environ: Mapping[str, str] = None,
                     not_used: Optional[Dict[str, str]] = None) -> dict:
    """Merge defaults, the config file and environment variables, and check the values.

    A name that no trainer of this package declares is an error (a typo must not silently fall back to a default);
    a name that only other trainers declare is skipped and reported in ``not_used`` (name -> where it was set), for
    the trainer to log once. A variable that differs from the prefix only in case (``nnUNet_SSL_...``) is an error.
    """
    environ = os.environ if environ is None else environ
    trainer_name = trainer_mro_names[0]
    settings = dict(defaults)
    sources: Dict[str, str] = {}
    valid = ", ".join(sorted(defaults))
    not_used = {} if not_used is None else not_used
    others: Optional[Dict[str, str]] = None

    def accept(name: str, where: str) -> bool:
        nonlocal others
        if name in defaults:
            return True
        if others is None:
            others = settings_of_other_trainers(defaults)
        if name in others:
            not_used[name] = where
            return False
        raise SettingsError(f"{where}: unknown setting '{name}' for {trainer_name}. Valid settings: {valid}.")

    config_path = environ.get(CONFIG_ENV)
    if config_path:
        if not os.path.isfile(config_path):
            raise SettingsError(f"{CONFIG_ENV}={config_path}: file not found. Point it to a JSON file of "
                                f"semi-supervised settings, or unset it.")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{config_path}: not valid JSON ({e}).") from None
        if not isinstance(config, dict):
            raise SettingsError(f"{config_path}: expected a JSON object of setting names to values.")
        sections = {k: v for k, v in config.items() if k.startswith("nnUNetTrainer") and isinstance(v, dict)}
        unknown_sections = [k for k in sections if k not in trainer_mro_names and not _is_trainer_name(k)]
        if unknown_sections:
            raise SettingsError(f"{config_path}: section {unknown_sections[0]!r} names no trainer of nnU-Net or of "
                                f"this package (a typo?); sections apply to the trainer they name and its "
                                f"subclasses.")
        flat = {k: v for k, v in config.items() if k not in sections}
        # a section applies to its trainer and subclasses (most specific last, so it wins)
        layers = [flat] + [sections[n] for n in reversed(trainer_mro_names) if n in sections]
        for layer in layers:
            for name, value in layer.items():
                if accept(name, config_path):
                    settings[name] = _check_type(name, value, defaults[name], config_path)
                    sources[name] = config_path

    for key, raw in environ.items():
        if key == CONFIG_ENV or not key.lower().startswith(ENV_PREFIX.lower()):
            continue
        if not key.startswith(ENV_PREFIX):
            raise SettingsError(f"environment variable {key}: settings are read from variables that start with "
                                f"exactly '{ENV_PREFIX}' (case matters); rename it to {ENV_PREFIX}"
                                f"{key[len(ENV_PREFIX):]}.")
        name = key[len(ENV_PREFIX):]
        where = f"environment variable {key}"
        if accept(name, where):
            settings[name] = _convert(name, raw, defaults[name], where)
            sources[name] = where
    check_setting_values(settings, sources, trainer_name)
    return settings


def _is_trainer_name(name: str) -> bool:
    """True for this package's trainers (budget variants included) and nnU-Net's own trainer classes."""
    if any(cls.__name__ == name for cls in package_trainer_classes()):
        return True
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                       "nnunetv2.training.nnUNetTrainer") is not None


def comparable_settings(settings: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None) -> dict:
    """Settings as a resumed run must match them: a generalist's checkpoint counts by its content (SHA-256), not its
    path, so a run can continue on a node where the same file lives elsewhere (the README suggests copying
    checkpoints to offline nodes); a different file with the same name is still a change. With ``defaults``, a
    setting missing from a record counts as its default: a setting added to a trainer after a run started (with
    the old behaviour as its default) does not block that run's ``--c``."""
    out = {**(defaults or {}), **settings}
    if out.get("generalists") in (None, "", []):
        return out
    from nnunet_foundation.foundation.config import GeneralistConfigError, generalists_by_content

    try:
        out["generalists"] = generalists_by_content(out["generalists"])
    except GeneralistConfigError:
        pass  # unreadable now: compared as written, so the refusal shows both values
    return out


def record_or_check_settings(output_folder: str, settings: dict, trainer_name: str, resuming: bool,
                             defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Write the settings of a new run; on resume, refuse settings that differ from the recorded ones (a setting the
    record lacks counts as its entry in ``defaults``, see :func:`comparable_settings`)."""
    path = os.path.join(output_folder, SETTINGS_FILE)
    record = {"trainer": trainer_name, "settings": settings}
    if resuming and os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        old, settings = comparable_settings(previous.get("settings", {}), defaults), comparable_settings(settings)
        changed = {k: (old.get(k, "<missing>"), settings.get(k, "<missing>"))
                   for k in sorted(set(old) | set(settings)) if old.get(k, "<missing>") != settings.get(k, "<missing>")}
        if changed:
            lines = "\n".join(f"  {k}: recorded {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise SettingsError(
                f"Refusing to resume: the semi-supervised settings differ from those recorded in {path}:\n{lines}\n"
                f"Restore the recorded settings (environment variables {ENV_PREFIX}<name> / {CONFIG_ENV}) to "
                f"continue this run, or start a new run without --c (or in another output folder) to use the new "
                f"ones.")
        return
    os.makedirs(output_folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
