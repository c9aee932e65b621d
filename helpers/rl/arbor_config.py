"""Reading an Arbor server configuration file and flagging keys current Arbor ignores (06_grpo_training)."""

import difflib
import warnings
from importlib import resources
from pathlib import Path

import yaml

from helpers.util.errors import TutorialError

KNOWN = {"storage_path", "inactivity_timeout"}
OBSOLETE = {
    ("inference", "gpu_ids"): "num_inference_gpus",
    ("training", "gpu_ids"): "num_training_gpus",
}


def default_path() -> Path:
    """The tutorial's arbor.yaml: the checkout's top-level file, else the copy shipped inside the installed package."""
    checkout = Path(__file__).resolve().parents[2] / "arbor.yaml"
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("helpers").joinpath("arbor.yaml")))


def _yaml_error(path: Path, exc: yaml.YAMLError) -> TutorialError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return TutorialError(f"{path} is not valid YAML{where} ({what}): fix it or copy arbor.yaml again")


def read(path) -> dict:
    """The YAML as a dict; warns once per obsolete ``inference.gpu_ids`` / ``training.gpu_ids`` key and per unknown key."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        config = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise TutorialError(f"no Arbor config at {path}: copy arbor.yaml from the repository") from None
    except IsADirectoryError:
        raise TutorialError(f"{path} is a folder, not a file: pass the path of arbor.yaml") from None
    except UnicodeDecodeError as exc:
        raise TutorialError(f"{path} is not a UTF-8 text file (byte {exc.start + 1}): copy arbor.yaml from the repository") from None
    except OSError as exc:
        raise TutorialError(f"cannot read {path} ({exc.strerror}): check the path and its permissions") from None
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if not isinstance(config, dict):
        raise TutorialError(f"{path} must be a YAML mapping of settings, got {type(config).__name__}")
    for (section, key), replacement in OBSOLETE.items():
        if isinstance(config.get(section), dict) and key in config[section]:
            warnings.warn(f"{path}: `{section}.{key}` is ignored by current Arbor; set `{replacement}` in the GRPO "
                          "train_kwargs instead (see helpers/rl/grpo_presets.py)", stacklevel=2)
    sections = {section for section, _ in OBSOLETE}
    for key in config:
        if key in KNOWN or key in sections:
            continue
        valid = sorted(KNOWN | sections)
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(valid)}"
        warnings.warn(f"{path}: current Arbor ignores the unknown key `{key}`; {hint}", stacklevel=2)
    return config
