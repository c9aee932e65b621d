"""What a GRPO job run through an Arbor server did, read back over HTTP (06 with ``RLMH_LM=arbor``).

In this kernel, ``grpo_training.job_of`` hands 06 the CPU backend's own job. Through Arbor the job lives in the server,
and the client (Arbor's ``ArborProvider``) keeps only its name, written into ``lm.model``. ``read(lm)`` asks the
server for the rest: ``POST /v1/fine_tuning/grpo/status`` (Arbor's checkpoints) and, from the CPU Arbor server,
``GET /v1/cpu/steps`` (each trainer step's log and data check, as the CPU backend keeps them). Arbor's own server has no
such route: then the job has no steps to show, and says so.
"""

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields

from helpers.backend.grpo_backend import StepLog
from helpers.backend.grpo_data import DataCheck
from helpers.util.errors import TutorialError

PREFIX = "openai/arbor:"


@dataclass
class ArborJob:
    """A finished GRPO job on an Arbor server, in the shape 06 reads (``curve``, ``data_check``, ``verdict``)."""

    job_id: str
    current_model: str  # the name that answers with the trained weights (the client's lm.model, without its prefix)
    checkpoints: dict  # name -> {"path": ...} on the server's disk
    last_checkpoint: str | None
    history: list[StepLog] = field(default_factory=list)  # one per trainer step (CPU server only)
    checks: list[DataCheck] = field(default_factory=list)
    received_items: list[int] = field(default_factory=list)  # completions each trainer step received over HTTP
    steps_reported: bool = False  # False: Arbor's own server, which does not report its steps
    best_checkpoint: None = None  # no held-back choice over HTTP: the server keeps serving the last step's weights


def job_name(lm) -> str | None:
    """The GRPO job ``lm`` names (``grpo:...``), or None if no job has trained it."""
    name = str(lm.model).removeprefix(PREFIX).split("@w")[0]
    return name if name.startswith("grpo:") else None


def read(lm, timeout: float = 60.0) -> ArborJob | None:
    """The job that trained ``lm`` on its Arbor server, or None if none has (``lm.model`` is still the base name)."""
    job_id = job_name(lm)
    if job_id is None:
        return None
    base = lm.kwargs["api_base"]
    status = _call(base + "fine_tuning/grpo/status", {"job_id": job_id}, timeout)
    checkpoints = {name: {"path": record.get("path") or record.get("checkpoint_dir")}  # Arbor's server: checkpoint_dir
                   for name, record in (status.get("checkpoints") or {}).items() if isinstance(record, dict)}
    job = ArborJob(job_id, status["current_model"], checkpoints, status.get("last_checkpoint"))
    try:
        steps = _call(base + "cpu/steps", None, timeout)["jobs"].get(job_id, {}).get("steps", [])
    except _NotThere:
        return job  # Arbor's own server
    names = {f.name for f in fields(StepLog)}
    for step in steps:
        job.history.append(StepLog(**{k: v for k, v in step.items() if k in names}))
        job.checks.append(DataCheck(**step["data"]))
        job.received_items.append(step["received_items"])
    job.steps_reported = True
    return job


class _NotThere(Exception):
    pass


def _call(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and body is None:
            raise _NotThere from None
        raise TutorialError(f"the Arbor server answered {exc.code} to {url}: {exc.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TutorialError(f"the Arbor server at {url} did not answer ({getattr(exc, 'reason', exc)}): is it still "
                            "running?") from None
