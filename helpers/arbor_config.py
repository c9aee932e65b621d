"""Reading an Arbor server configuration file and flagging keys current Arbor ignores (06_grpo_training)."""

import warnings
from pathlib import Path

import yaml

from helpers.errors import TutorialError

KNOWN = {"storage_path", "inactivity_timeout"}
OBSOLETE = {
    ("inference", "gpu_ids"): "num_inference_gpus",
    ("training", "gpu_ids"): "num_training_gpus",
}


def read(path) -> dict:
    """The YAML as a dict; warns once per obsolete ``inference.gpu_ids`` / ``training.gpu_ids`` key."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise TutorialError(f"no Arbor config at {path}: copy arbor.yaml from the repository") from None
    except yaml.YAMLError as exc:
        raise TutorialError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}): fix it or copy arbor.yaml again") from None
    if not isinstance(config, dict):
        raise TutorialError(f"{path} must be a YAML mapping of settings, got {type(config).__name__}")
    for (section, key), replacement in OBSOLETE.items():
        if isinstance(config.get(section), dict) and key in config[section]:
            warnings.warn(f"{path}: `{section}.{key}` is ignored by current Arbor; set `{replacement}` in the GRPO "
                          "train_kwargs instead (see helpers/grpo_presets.py)", stacklevel=2)
    return config
