"""ChatAdapter with field-by-field prefills, for models too small to write DSPy's markers (04_research_hop).

SmolLM2-135M rarely writes ``[[ ## field ## ]]`` markers on its own (see the table in 04). This
adapter writes the markers itself: for each output field it opens the assistant turn with everything
so far plus ``[[ ## field ## ]]``, and the LM only fills in the value, stopping at a blank line.
The system message is just the signature's instructions: the field-structure template ChatAdapter
adds costs ~200 prompt tokens per call and the small model copies its ``{placeholders}``. The pieces are joined into an ordinary ChatAdapter reply and parsed by
ChatAdapter, so programs, traces and GRPO's training data look exactly as with ChatAdapter (GRPO
accepts it because it is a ChatAdapter). It needs an LM that continues a final assistant message,
as the embedded engine does; API servers usually do not.
"""

import textwrap

import dspy
from dspy.clients._deprecation import adapter_message_call
from dspy.utils.exceptions import AdapterParseError

from helpers.engine import local_lm

STOPS = ("\n\n", "[[")


class GuidedChatAdapter(dspy.ChatAdapter):
    """One LM call per output field, each continuing a prefilled ``[[ ## field ## ]]`` marker."""

    def __init__(self, max_tokens_per_field: int = 64, **kwargs):
        super().__init__(use_json_adapter_fallback=False, **kwargs)
        self.max_tokens_per_field = max_tokens_per_field

    def format_system_message(self, signature) -> str:
        return textwrap.dedent(signature.instructions).strip()

    def user_message_output_requirements(self, signature) -> str:
        return "Respond with " + ", then ".join(f"`{name}`" for name in signature.output_fields) + "."

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        messages = self.format(signature, demos, inputs)
        kwargs = {k: v for k, v in lm_kwargs.items() if k not in ("n", "stop", "max_tokens")}
        kwargs.update(stop=list(STOPS), max_tokens=self.max_tokens_per_field)
        replies = [self._reply(lm, messages, signature, kwargs) for _ in range(lm_kwargs.get("n", 1))]
        return self._call_postprocess(signature, signature, replies, lm, lm_kwargs)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        return self(lm, lm_kwargs, signature, demos, inputs)

    def _reply(self, lm, messages, signature, kwargs) -> str:
        reply = ""
        for name in signature.output_fields:
            reply += f"[[ ## {name} ## ]]\n"
            conversation = [*messages, {"role": "assistant", "content": reply}]
            with adapter_message_call(lm, conversation), local_lm.call_options(nonblank=True, tags={"field": name}):
                out = lm(messages=conversation, **kwargs)[0]
            value = (out.get("text") if isinstance(out, dict) else out or "").strip()
            if not value:
                raise AdapterParseError(adapter_name=type(self).__name__, signature=signature, lm_response=reply,
                                        message=f"The LM wrote nothing for the field `{name}`.")
            reply += value + "\n\n"
        return reply + "[[ ## completed ## ]]\n"
