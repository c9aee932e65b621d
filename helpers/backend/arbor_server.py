"""A CPU Arbor server: Arbor 0.2.17's HTTP protocol in front of the embedded engine and the local GRPO job (06).

The seeds train through ``dspy.LM("openai/arbor:...", provider=ArborProvider(), api_base=...)`` against ``arbor
serve``, which needs NVIDIA GPUs. This server answers the requests Arbor's client sends, so the seeds' client code
(``ArborProvider``, dspy's ``GRPO``, ``ArborGRPO``) runs unchanged on a laptop:

* ``POST /v1/chat/completions``: OpenAI-style chat, decoded by the ``BatchingEngine`` (continuous batching, prefix
  reuse). ``openai/`` and ``arbor:`` are stripped from the model name as Arbor does. A conversation ending in an
  assistant message is continued (``GuidedChatAdapter``'s prefills); when that message ends in a ``[[ ## field ## ]]``
  marker, the first token must be visible, as the in-process adapter asks with ``local_lm.call_options``.
* ``POST /v1/fine_tuning/grpo/{initialize,status,step,checkpoint,terminate}``: a ``grpo_backend.LocalReinforceJob``
  (LoRA on the live model, ``grpo_data.OnPolicyData``, checkpoints). Bodies are validated with Arbor's own pydantic
  models (``helpers.util.arbor_files.schemas()``, ``extra="forbid"``) and answered with its ``GRPOStatus``.
* ``GET /v1/models`` (what ``lm_setup.check_reachable`` probes) and ``GET /v1/cpu/steps`` (each job's ``StepLog``s:
  the matched and sampled shares of every training step; Arbor has no such route).

Behaviour the client depends on follows Arbor: ``current_model`` names the job (``grpo:<model>:<run>:<date>``) and is
what the client writes into ``lm.model``; the client's ``batch_id`` is ignored and ``pending_batch_ids`` come from
the server; a group whose size is not ``num_generations`` is refused; ``terminate`` saves ``checkpoint_final`` and the
job's model keeps answering; ``chat/launch`` / ``chat/kill`` validate their bodies as Arbor's server does (the
client's own bodies fail there too).

Rounds: dspy's ``GRPO`` (and ``ArborGRPO``) sends, after each step's rollouts, one group for each of the status'
``pending_batch_ids``, from a queue it refills with shuffled copies of that step's groups; what it does not send stays
queued for the next step. Arbor announces batches its trainer wants next; announcing fewer than a step yields would
leave this step's groups in the queue, and the next step would send them, stale. So the server announces a round of
``ROUND_GROUPS`` ids and runs one trainer step when the round's last group arrives. A step of T groups leaves fewer
than T in dspy's queue, so with T <= ROUND_GROUPS / 2 (32: 16 claims of two predictors) every group of the step is in
its round; the leftovers and repeats match no sampled row and are not trained, and the next rollouts sample from the
new weights. A round with no repeat at all may have been too small: the server logs a warning. Within a trainer step, an optimizer step takes
``per_device_train_batch_size * gradient_accumulation_steps`` rows, as in Arbor's trainer.

On-policy over HTTP: the server receives text, but trains what its engine sampled. The job's ``OnPolicyData`` records
every sampled row (exact prompt ids, sampled ids, rollout-time log-probs) and matches each item of a group to those
records; an item that matches none is not trained and is counted (``matched_share`` in ``/v1/cpu/steps``).

Stale answers: DSPy's cache keys on model name and messages, not on weights, and Arbor's job name stays the same
while it trains. So ``current_model`` carries the weights' digest (``<job id>@w<digest>``, ``engine.weights_tag``):
after each trainer step the client's ``lm.model`` is a new name, and a name whose weights are gone is refused (409)
instead of being answered by other weights. The bare job id answers with the job's current weights.

Errors are JSON in the shape of Arbor's exception handler, ``{"type", "message", "timestamp"}``, one line, 4xx for
every bad request (422 for a body its schema refuses).
"""

import json
import logging
import re
import threading
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from helpers.backend import lora_policy
from helpers.backend.grpo_backend import LocalReinforceJob
from helpers.engine import local_lm
from helpers.util import arbor_files
from helpers.util.errors import TutorialError

log = logging.getLogger(__name__)

LIMITS = ("CPU only: no GPUs, no vLLM and no weight sync between processes; one embedded model trains and serves "
          "in this process, one GRPO job's LoRA at a time")
HOST = "127.0.0.1"
MAX_BODY = 32 * 2**20  # bytes: a request past this is refused before it is read
MAX_N = 32  # completions per chat request
ROUND_GROUPS = 64  # batch ids announced per trainer step: a step of up to 32 groups fits whole (seed 000's: 12)
CHAT_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "n", "stop", "top_k", "repetition_penalty",
               "seed", "stream"}  # what Arbor's client (litellm) sends; seed is read and ignored (one generator per process)
FIELD_MARKER = re.compile(r"\[\[ ## \w+ ## \]\]\n$")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class HTTPError(Exception):
    """A request the server refuses: status, error type and a one-line message (Arbor's error payload)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(" ".join(message.split()))
        self.status, self.kind = status, kind


def error_payload(kind: str, message: str) -> dict:
    return {"type": kind, "message": message, "timestamp": datetime.now().isoformat()}


def strip_prefix(model: str) -> str:
    """The served name of ``model``: Arbor strips these prefixes before routing."""
    for prefix in ("openai/", "huggingface/", "local:", "arbor:"):
        if model.startswith(prefix):
            model = model[len(prefix):]
    return model


@dataclass
class ServedJob:
    """One GRPO job: Arbor's name for it, the local job that trains, and the groups waiting for a trainer step."""

    arbor_id: str
    job: LocalReinforceJob
    num_generations: int
    round_end: int = ROUND_GROUPS  # the trainer step runs when this many groups have arrived in all
    pending: list = field(default_factory=list)  # groups received since the last trainer step
    received: int = 0  # groups received in all (the next batch id)
    dropped: int = 0  # groups still pending at terminate (never trained)
    terminated: bool = False
    replaced_by: str | None = None  # a later job whose LoRA took this one's place on the model
    records: dict = field(default_factory=dict)  # checkpoint name -> Arbor's checkpoint record
    items: list = field(default_factory=list)  # per trainer step: the items (completions) it received


class ArborCPU:
    """The server's state and its routes, apart from HTTP (``handle`` takes a method, a path and the body bytes)."""

    def __init__(self, engine, storage: Path):
        self.engine, self.storage = engine, Path(storage)
        self.schemas = arbor_files.schemas()
        self.jobs: dict[str, ServedJob] = {}
        self.live: ServedJob | None = None  # the job whose LoRA is on the model
        self.lock = threading.Lock()  # GRPO routes take turns; chat calls only read which job is live

    # --- routing ----------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
        try:
            route = urlparse(path).path.rstrip("/")
            if method == "GET" and route == "/v1/models":
                return 200, self.models()
            if method == "GET" and route == "/v1/cpu/steps":
                return 200, self.steps()
            posts = {"/v1/chat/completions": self.chat, "/v1/chat/launch": self.launch, "/v1/chat/kill": self.kill,
                     **{f"/v1/fine_tuning/grpo/{name}": getattr(self, f"grpo_{name}")
                        for name in ("initialize", "status", "step", "checkpoint", "terminate")}}
            if route not in posts or method != "POST":
                known = ", ".join(f"POST {p}" for p in posts)
                raise HTTPError(404, "NotFound", f"no route {method} {route}: this CPU Arbor server answers {known}, "
                                "GET /v1/models and GET /v1/cpu/steps")
            return 200, posts[route](self._json(body))
        except HTTPError as exc:
            return exc.status, error_payload(exc.kind, str(exc))
        except TutorialError as exc:  # e.g. a prompt past the context window, an unreadable adapter
            return 400, error_payload(type(exc).__name__, str(exc))
        except Exception as exc:  # a bug: answered, logged, and the server keeps serving
            log.exception("request %s %s failed", method, path)
            return 500, error_payload(type(exc).__name__, " ".join(str(exc).split())[:500])

    @staticmethod
    def _json(body: bytes | None) -> dict:
        try:
            data = json.loads(body or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, "JSONDecodeError", f"the body is not JSON ({exc}): send a JSON object") from None
        if not isinstance(data, dict):
            raise HTTPError(422, "RequestValidationError", f"the body is JSON {type(data).__name__}, not an object")
        return data

    def _validate(self, model_name: str, body: dict):
        """``body`` as Arbor's pydantic model ``model_name``; its first complaint as one line (422) otherwise."""
        from pydantic import ValidationError

        try:
            return getattr(self.schemas, model_name).model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise HTTPError(422, "RequestValidationError",
                            f"{model_name}: {where}: {first['msg']}{more} (Arbor {arbor_files.ARBOR_VERSION}'s schema)") from None

    def _dump(self, model_name: str, **values) -> dict:
        """A response body, built by Arbor's own response model (so it is one the real server could send)."""
        return getattr(self.schemas, model_name)(**values).model_dump(mode="json")

    # --- which weights a model name means -------------------------------------------------------------------------
    def _is_base(self, name: str) -> bool:
        return name.split("/")[-1].lower() == self.engine.name.lower()

    def current_model(self, served: ServedJob) -> str:
        return served.arbor_id + (self.engine.weights_tag if served is self.live else "")

    def _route(self, asked: str) -> None:
        """Refuse a model name this process cannot answer with the weights it names."""
        name = strip_prefix(asked)
        if self._is_base(name):
            if self.live is not None:
                raise HTTPError(409, "ModelBusy", f"{name} is being trained as {self.live.arbor_id}: this CPU server "
                                f"holds one set of weights, ask for {self.current_model(self.live)!r}")
            return
        job_id, tagged, tag = name.partition("@w")
        served = self.jobs.get(job_id)
        if served is None:
            names = [self.engine.name, *(self.current_model(s) for s in self.jobs.values() if s is self.live)]
            raise HTTPError(404, "ModelNotFound", f"unknown model {asked!r}: this server serves {', '.join(names)}")
        if served is not self.live:
            raise HTTPError(409, "ModelReplaced", f"{job_id}'s weights were replaced by job {served.replaced_by}'s "
                            "(one LoRA at a time on CPU): load its checkpoint into a new job, or ask for the new job")
        if tagged and "@w" + tag != self.engine.weights_tag:
            raise HTTPError(409, "StaleModel", f"{name} names weights {job_id} no longer holds (it trained since): "
                            f"ask for current_model {self.current_model(served)!r} (POST /v1/fine_tuning/grpo/status)")

    # --- inference --------------------------------------------------------------------------------------------------
    def chat(self, body: dict) -> dict:
        from dspy.lm15 import Config, Message, Request

        unknown = sorted(set(body) - CHAT_FIELDS)
        if unknown:
            raise HTTPError(422, "RequestValidationError", f"unknown chat field(s) {unknown}: this server reads "
                            f"{sorted(CHAT_FIELDS)}")
        request = self._validate("ChatCompletionRequest",
                                 {k: body[k] for k in ("model", "messages", "temperature", "top_p", "max_tokens") if k in body})
        n, top_k, stop = body.get("n", 1), body.get("top_k"), body.get("stop") or []
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise HTTPError(422, "RequestValidationError", f"n={n!r}: ask for 1 to {MAX_N} completions")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
            raise HTTPError(422, "RequestValidationError", f"top_k={top_k!r} is not an integer (-1 or 0: no top-k)")
        if body.get("repetition_penalty", 1.0) != 1.0:
            raise HTTPError(422, "RequestValidationError", "repetition_penalty other than 1.0 is not supported by the "
                            "embedded engine: leave it at 1.0")
        if body.get("stream"):
            raise HTTPError(422, "RequestValidationError", "stream=true is not supported: ask for whole replies")
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise HTTPError(422, "RequestValidationError", f"stop={body.get('stop')!r}: give a string or up to 4 strings")
        messages = [m.model_dump() for m in request.messages]
        if not messages or any(m["role"] == "system" for m in messages[1:]):
            raise HTTPError(422, "RequestValidationError", "messages: give at least one, with a system message only first")
        self._route(request.model)
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
        if not messages:
            raise HTTPError(422, "RequestValidationError", "messages: a system message alone gives the model nothing to answer")
        turns = tuple(Message.user(m["content"]) if m["role"] == "user" else Message.assistant(m["content"]) for m in messages)
        config = Config(max_tokens=request.max_tokens or 256, temperature=request.temperature or 0.0,
                        top_p=request.top_p, top_k=top_k if top_k and top_k > 0 else None, stop=tuple(stop))
        engine_request = Request(model=self.engine.name, messages=turns, system=system, config=config)
        nonblank = messages[-1]["role"] == "assistant" and bool(FIELD_MARKER.search(messages[-1]["content"]))

        def one(_):
            with local_lm.call_options(nonblank=nonblank):
                return self.engine.complete(engine_request)

        with ThreadPoolExecutor(n) as pool:  # n calls at once: the engine decodes them in one batch
            replies = list(pool.map(one, range(n)))
        choices = [{"index": i, "finish_reason": r.finish_reason if r.finish_reason in ("stop", "length") else "stop",
                    "message": {"role": "assistant", "content": r.message.text or ""}} for i, r in enumerate(replies)]
        return self._dump("ChatCompletionModel", id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                          model=strip_prefix(request.model), choices=choices)

    def launch(self, body: dict) -> dict:
        request = self._validate("InferenceLaunchRequest", body)
        self._route(request.model)
        return {"message": "Inference server launched", "job_id": "embedded", "model": strip_prefix(request.model)}

    def kill(self, body: dict) -> dict:
        self._validate("InferenceTerminateRequest", body)
        return {"message": "the embedded engine keeps serving (it is this process)"}

    def models(self) -> dict:
        names = [self.engine.name] + ([self.current_model(self.live)] if self.live else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "arbor-cpu"} for n in names]}

    def steps(self) -> dict:
        """Per job, each trainer step's ``StepLog`` and data check, and how many of the completions its round received
        matched none of the engine's sampled rows (``unmatched_items``: the round's repeats and leftovers by design,
        and anything never sampled; none of them is trained). ``data.items`` / ``data.matched_items``: the fresh
        groups' completions, which must all match."""
        def step(record, check, items):
            return {**asdict(record), "data": asdict(check), "received_items": items,
                    "unmatched_items": items - check.matched_items,
                    "matched_of_received": check.matched_items / items if items else 1.0}

        return {"jobs": {s.arbor_id: {"steps": [step(*row) for row in zip(s.job.history, s.job.checks, s.items)],
                                      "dropped_groups": s.dropped, "pending_groups": len(s.pending)}
                         for s in self.jobs.values()}}

    # --- GRPO -------------------------------------------------------------------------------------------------------
    def grpo_initialize(self, body: dict) -> dict:
        request = self._validate("GRPOInitializeRequest", body)
        if not self._is_base(strip_prefix(request.model)):
            raise HTTPError(404, "ModelNotFound", f"this CPU server trains {self.engine.name} only, not {request.model!r}")
        config = request.trainer_config
        if not config.num_generations or config.num_generations < 2:
            raise HTTPError(422, "RequestValidationError", "trainer_config.num_generations must be >= 2 (GRPO compares "
                            "the completions of a group)")
        if request.run_name is not None and not SAFE_NAME.fullmatch(request.run_name):
            raise HTTPError(422, "RequestValidationError", f"run_name {request.run_name!r}: use letters, digits, '_', '-', '.'")
        with self.lock:
            if self.live is not None and not self.live.terminated:
                raise HTTPError(409, "JobRunning", f"job {self.live.arbor_id} is still training: terminate it first "
                                "(one GRPO job at a time on CPU)")
            samples = (config.per_device_train_batch_size or 8) * (config.gradient_accumulation_steps or 1)
            # gradient_checkpointing (the client's default: True) only saves GPU memory; the shared-prefix log-probs it
            # would replace give the same numbers ~2x faster on CPU, so it is read and ignored
            kwargs = {k: v for k, v in config.model_dump(exclude_none=True).items()
                      if k not in ("lora_config", "gradient_checkpointing", "gradient_checkpointing_kwargs")}
            suffix = uuid.uuid4().hex[:8]
            kwargs.update(job_id=f"grpo-{suffix}", checkpoint_dir=str(self.storage), checkpoint_every_step=False,
                          groups_per_step=ROUND_GROUPS,
                          lora_config=config.lora_config.model_dump() if config.lora_config else None)
            arbor_id = f"grpo:{self.engine.name.lower()}:{request.run_name or suffix}:{datetime.now():%Y%m%d}"
            if self.live is not None:  # a terminated job: its LoRA leaves the model
                lora_policy.remove_lora(self.engine)
                self.live.replaced_by = arbor_id
                self.live = None
            job = LocalReinforceJob(types.SimpleNamespace(model=arbor_id), kwargs)
            served = ServedJob(arbor_id, job, config.num_generations)
            job.initialize()
            self.jobs[arbor_id], self.live = served, served
            self._record(served, job.last_checkpoint, {"step": 0})
            log.info("GRPO job %s: a trainer step every %d group(s) of %d, optimizer steps of %d rows", arbor_id,
                     ROUND_GROUPS, served.num_generations, samples)
            return self.status(served)

    def _job(self, job_id: str, running: bool = True) -> ServedJob:
        served = self.jobs.get(job_id)
        if served is None:
            raise HTTPError(404, "KeyError", f"no GRPO job {job_id!r}: POST /v1/fine_tuning/grpo/initialize first "
                            f"(jobs here: {sorted(self.jobs) or 'none'})")
        if running and served.terminated:
            raise HTTPError(409, "JobTerminated", f"job {job_id} is terminated: its model still answers; start a new job to train")
        return served

    def status(self, served: ServedJob) -> dict:
        pending = [] if served.terminated else list(range(served.received, served.round_end))
        return self._dump("GRPOStatus", job_id=served.arbor_id, status="succeeded" if served.terminated else "running",
                          current_model=self.current_model(served), checkpoints=served.records,
                          last_checkpoint=served.job.last_checkpoint, pending_batch_ids=pending)

    def grpo_status(self, body: dict) -> dict:
        return self.status(self._job(self._validate("GRPOBaseRequest", body).job_id, running=False))

    def grpo_step(self, body: dict) -> dict:
        request = self._validate("GRPOStepRequest", body)
        with self.lock:
            served = self._job(request.job_id)
            groups = request.batch if request.batch and isinstance(request.batch[0], list) else [request.batch]
            for group in groups:
                self._check_group(group, served.num_generations)
            served.pending.extend(groups)
            served.received += len(groups)
            if served.received >= served.round_end:  # the round is complete: one trainer step on all of it
                batch, served.pending = served.pending, []
                served.round_end = served.received + ROUND_GROUPS
                served.items.append(sum(len(g) for g in batch))
                record = served.job.step([{"batch_id": i, "group": g} for i, g in enumerate(batch)], "grpo_chat")
                check = served.job.checks[-1]
                if check.stale_groups == 0:
                    log.warning("%s step %d: every group of the round of %d was fresh, so the step may have had more "
                                "groups than fit: ask for fewer claims per step", served.arbor_id, record.step, len(batch))
                log.info("%s step %d: %d group(s), %d/%d completions found among the sampled rows, sampled %.0f%%, "
                         "loss %.4f, %.1f s", served.arbor_id, record.step, record.groups, check.matched_items,
                         served.items[-1], 100 * record.sampled_share, record.loss, record.seconds)
            return self.status(served)

    @staticmethod
    def _check_group(group, num_generations: int) -> None:
        """Arbor's checks of a group: items with messages, completion and a numeric reward; ``num_generations`` of them."""
        if not isinstance(group, list) or not group:
            raise HTTPError(400, "ValueError", "batch: give a group (a list of items) or a list of groups")
        for i, item in enumerate(group):
            if not isinstance(item, dict) or not {"messages", "completion", "reward"} <= set(item):
                raise HTTPError(400, "ValueError", f"batch item {i}: each item must contain messages, completion and reward")
            messages, completion, reward = item["messages"], item["completion"], item["reward"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         and m.get("role") in ("system", "user", "assistant") for m in messages):
                raise HTTPError(400, "ValueError", f"batch item {i}: messages must be a list of {{role, content}} messages")
            if not isinstance(completion, dict) or not isinstance(completion.get("content"), str):
                raise HTTPError(400, "ValueError", f"batch item {i}: completion must be {{role: assistant, content: str}}")
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise HTTPError(400, "ValueError", f"batch item {i}: reward {reward!r} is not a number")
        if len(group) != num_generations:
            raise HTTPError(400, "ValueError", f"Expected {num_generations} samples in the group, received {len(group)}")

    def _record(self, served: ServedJob, name: str | None, metadata: dict | None) -> None:
        if name is None:
            return
        served.records[name] = {"checkpoint_name": name, "path": served.job.checkpoints[name]["path"],
                                "timestamp": time.time(), "metadata": metadata or {}}

    def grpo_checkpoint(self, body: dict) -> dict:
        request = self._validate("GRPOCheckpointRequest", body)
        if not SAFE_NAME.fullmatch(request.checkpoint_name):
            raise HTTPError(422, "RequestValidationError", f"checkpoint_name {request.checkpoint_name!r}: use letters, "
                            "digits, '_', '-', '.' (it names a folder)")
        with self.lock:
            served = self._job(request.job_id)
            served.job.save_checkpoint(request.checkpoint_name, metadata=request.metadata)
            self._record(served, request.checkpoint_name, request.metadata)
            return self.status(served)

    def grpo_terminate(self, body: dict) -> dict:
        request = self._validate("GRPOTerminateRequest", body)
        with self.lock:
            served = self._job(request.job_id)
            served.dropped, served.pending = len(served.pending), []
            served.job.save_checkpoint("checkpoint_final", metadata={"steps": len(served.job.history)})
            self._record(served, "checkpoint_final", {"steps": len(served.job.history)})
            served.job.terminate()  # recording stops; the LoRA stays on the model, so the job's name keeps answering
            served.terminated = True
            return self.status(served)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ArborCPU"

    def do_GET(self):
        self._answer(*self.server.app.handle("GET", self.path, None))

    def do_POST(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._answer(411, error_payload("LengthRequired", "send a Content-Length header with the JSON body"))
        if int(length) > MAX_BODY:
            self.close_connection = True
            return self._answer(413, error_payload("PayloadTooLarge", f"the body has {int(length):,} bytes, more than "
                                                   f"{MAX_BODY:,}: send shorter prompts or smaller groups"))
        self._answer(*self.server.app.handle("POST", self.path, self.rfile.read(int(length))))

    def _answer(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


def make_server(engine, storage, port: int = 7453) -> ThreadingHTTPServer:
    """The server on ``127.0.0.1:port`` (0: a free port), not yet serving; ``serve_forever()`` starts it."""
    server = ThreadingHTTPServer((HOST, port), _Handler)
    server.daemon_threads = True
    server.app = ArborCPU(engine, storage)
    return server


def banner(server) -> str:
    return (f"CPU Arbor server (Arbor {arbor_files.ARBOR_VERSION}'s protocol) for {server.app.engine.name} on "
            f"http://{HOST}:{server.server_address[1]}/v1/ -- {LIMITS}")
