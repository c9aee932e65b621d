"""Grouped-query attention that reads the shared key/value heads in place (the engine's forward passes).

SmolLM2-135M has 9 query heads and 3 key/value heads. Given an attention mask on CPU, transformers' "sdpa"
attention copies every key/value head 3 times per layer (``repeat_kv``: each prefill on top of cached states has a
mask) or, for one query token, regroups the query heads (each batched decode step). torch's
``scaled_dot_product_attention`` can itself let 3 query heads share a key/value head (``enable_gqa``), with no copy
and bitwise the same result on this CPU kernel (tests/test_local_lm.py): a 24-claim evaluation took ≈ 10 % less on
a Zen 4 host, ≈ 3 % on a Zen 5 (within the noise there; benchmarks/RESULTS.md#engine). ``use(model)``
switches a model to it under the name ``sdpa_gqa`` (its masks are sdpa's); ``use(model, False)`` back to plain
"sdpa" (the reference engine, for the benchmarks' "before"). Where gradients are taken (training), it hands over to
transformers' sdpa: the trained weights stay exactly what they were.
"""

import functools

NAME = "sdpa_gqa"


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function protocol: ``[batch, heads, tokens, dim]`` in, ``([batch, tokens, heads, dim], None)`` out."""
    import torch

    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        # training (warm start, GRPO update): transformers' own path, so gradients stay bit for bit what they were
        # (with enable_gqa the key/value gradients are summed over the query heads in another order)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{NAME} attention supports neither softcap nor position bias: use 'sdpa'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal  # as sdpa decides it
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use(model, grouped: bool = True) -> None:
    """Make ``model`` (and every wrapper sharing its config) attend with ``sdpa_gqa`` (``grouped``) or plain ``sdpa``."""
    _register()
    wanted = NAME if grouped else "sdpa"
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)
