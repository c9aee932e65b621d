"""Which LM the notebooks talk to, per profile (introduced in 04_research_hop).

* mini: the embedded SmolLM2-135M-Instruct (``helpers.engine.local_lm``), a real ``dspy.LM``.
* full: Qwen behind an Arbor server, built exactly like the seed's current form.
* any profile, evaluation only: an OpenAI-compatible endpoint named by ``RLMH_OPENAI_BASE_URL``,
  ``RLMH_OPENAI_MODEL`` and ``RLMH_OPENAI_API_KEY`` (set ``RLMH_LM=openai``).

Servers are probed before anything long starts, so a wrong URL fails in one line.
"""

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request

import dspy

from helpers.engine import local_lm
from helpers.profiles import ARBOR_URL_ENV, DEFAULT_ARBOR_URL, LM_ENV, Profile
from helpers.util import arbor_files
from helpers.util.errors import TutorialError



def embedded_engine(profile: Profile) -> local_lm.BatchingEngine:
    """The in-process SmolLM2 engine, loaded once per process (converted GGUF cached in the profile)."""
    engine = local_lm.live_engine(local_lm.MODEL_NAME)
    if engine is None:
        model, tokenizer, info = local_lm.load_model(profile.cache_dir)
        engine = local_lm.register(local_lm.BatchingEngine(model, tokenizer, max_batch=16, load_info=info))
    return engine


def check_reachable(api_base: str, what: str, timeout: float = 3.0, setting: str = "") -> None:
    """GET ``{api_base}models``; raise a one-line TutorialError if nothing (or no HTTP server) answers.

    ``setting``: the environment variable that sets ``api_base``, named in the message.
    """
    hint = f" (set {setting})" if setting else ""
    parsed = urllib.parse.urlparse(api_base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise TutorialError(f"{what} api_base {api_base!r} is not an http:// or https:// URL with a host, "
                            f"e.g. http://localhost:7453/v1/{hint}")
    if not api_base.endswith("/v1/"):
        raise TutorialError(f"{what} api_base {api_base!r} must end in /v1/{hint}")
    try:
        urllib.request.urlopen(api_base + "models", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answered: good enough, the LM call will report auth or model errors
    except http.client.HTTPException as exc:  # BadStatusLine and friends: something listens, but not HTTP
        raise TutorialError(f"{what} at {api_base} is not an HTTP server ({type(exc).__name__}: {str(exc)[:60]!r}): "
                            f"check the port{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TutorialError(f"{what} at {api_base} is unreachable ({getattr(exc, 'reason', exc)}): start it first, or check the URL{hint}") from None


def arbor_lm(profile: Profile) -> dspy.LM:
    """The profile's model through an Arbor server, as the seed builds it.

    The server is real Arbor on NVIDIA GPUs, or the CPU one (``python -m helpers.rl.arbor_cpu serve``, the embedded
    model). The client is Arbor's own ``ArborProvider``, read from ``pip install --no-deps arbor-ai==0.2.17`` without
    Arbor's package ``__init__`` (``helpers.util.arbor_files``), so this machine needs no vllm or trl.
    """
    settings = profile.lm
    api_base = settings.api_base if settings.kind == "arbor" else (os.environ.get(ARBOR_URL_ENV, "").strip() or DEFAULT_ARBOR_URL)
    check_reachable(api_base, "the Arbor server", setting=ARBOR_URL_ENV)
    ArborProvider = arbor_files.provider_class()
    return dspy.LM(
        model=f"openai/arbor:{settings.model}",
        provider=ArborProvider(),
        api_base=api_base,
        api_key="arbor",
        temperature=settings.temperature,
        top_p=1.0,
        top_k=-1,
        repetition_penalty=1.0,
        max_tokens=settings.max_tokens,
    )


def openai_compatible_lm() -> dspy.LM:
    """Any OpenAI-compatible endpoint, for evaluation only (it cannot be trained with GRPO)."""
    base = os.environ.get("RLMH_OPENAI_BASE_URL", "")
    model = os.environ.get("RLMH_OPENAI_MODEL", "")
    key = os.environ.get("RLMH_OPENAI_API_KEY", "")
    missing = [n for n, v in [("RLMH_OPENAI_BASE_URL", base), ("RLMH_OPENAI_MODEL", model), ("RLMH_OPENAI_API_KEY", key)] if not v]
    if missing:
        raise TutorialError(f"RLMH_LM=openai needs {', '.join(missing)} set: base URL ending in /v1/, model name, API key")
    check_reachable(base, "the OpenAI-compatible endpoint")
    return dspy.LM(model=f"openai/{model}", api_base=base, api_key=key)


def make_lm(profile: Profile, trainable: bool = False, **overrides) -> dspy.LM:
    """The profile's LM as a ``dspy.LM``; ``overrides`` are default call arguments (e.g. temperature).

    ``trainable=True`` (06) attaches the provider GRPO trains through: Arbor's in the full profile,
    ``grpo_backend.LocalGRPOProvider`` (LoRA on CPU) for the embedded model.
    """
    choice = (os.environ.get(LM_ENV) or "").strip().lower() or profile.lm.kind  # blank counts as unset
    if choice == "openai":
        if trainable:
            raise TutorialError("RLMH_LM=openai is for evaluation only: GRPO needs the embedded LM or Arbor")
        lm = openai_compatible_lm()
    elif choice == "arbor":
        lm = arbor_lm(profile)
    elif choice == "embedded":
        engine = embedded_engine(profile)
        provider = None
        if trainable:
            from helpers.backend.grpo_backend import LocalGRPOProvider

            provider = LocalGRPOProvider()
        lm = local_lm.EmbeddedLM(f"local/{engine.name}", engine=engine, temperature=profile.lm.temperature,
                     max_tokens=profile.lm.max_tokens, provider=provider)
    else:
        raise TutorialError(f"unknown {LM_ENV}={choice!r}: choose embedded, arbor or openai")
    return lm.copy(**overrides) if overrides else lm
