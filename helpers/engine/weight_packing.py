"""oneDNN-packed copies of the model's linear weights, for the engine's forward passes without gradients.

Why: a decode step multiplies a few rows (1-16) by each of the model's 211 weight matrices, and PyTorch's fp32
``linear`` calls MKL's sgemm for it. On an AMD EPYC (Zen 4, 2 cores) MKL does that slowly: the 211 products took
97 ms at 7 rows with MKL and 40 ms with the same weights reordered once for oneDNN
(``torch.ops.mkldnn._reorder_linear_weight``), and a 7-row decode step 149 against 88 ms. On an Intel Xeon
(benchmarks/RESULTS.md#engine) packing also sped the products up alone, but the whole evaluation got slower
(36.1 -> 45.3 s). So ``worthwhile()`` packs where the CPU is not Intel's (MKL's fast paths are tuned for
Intel CPUs; oneDNN picks its kernels by instruction set); ``BatchingEngine(packed_weights=...)`` overrides it.

Greedy outputs: the 96 calls of a 24-claim evaluation came out token for token identical either way (the
results differ by ~1e-5 relative, summation order). Gradients: a forward with gradients on (the GRPO and warm
start updates) uses the original weights, so training is unchanged. Memory: one more copy of the weights
(513 MiB). Stale copies: the engine drops them in ``weights_changed()`` and packs again before its next call;
LoRA steps (``weights_changed(base=False)``) leave them: peft adds its terms to the base layers' outputs.
"""

import platform

from helpers.util.errors import TutorialError

LORA_MARK = "lora_"  # peft's adapter layers (lora_A / lora_B): small, and trained: never packed


def available() -> bool:
    """oneDNN is in this torch build and can reorder linear weights (x86-64 CPUs)."""
    import torch

    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...) or "" where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def worthwhile() -> bool:
    """Pack by default: where oneDNN can, and the CPU is not an Intel one (see the module's docstring)."""
    return available() and cpu_vendor() not in ("GenuineIntel", "")


def choose(setting: bool | None) -> bool:
    """``None``: pack where it is faster (``worthwhile``); ``True`` where oneDNN cannot fails in one line."""
    if setting is None:
        return worthwhile()
    if setting and not available():
        raise TutorialError("packed_weights=True needs oneDNN on an x86-64 CPU (torch.backends.mkldnn): pass None or False")
    return bool(setting)


class PackedWeights:
    """Packed copies of one model's linear weights, used by those layers' ``forward`` while gradients are off.

    ``remove()`` gives the layers their own ``forward`` back and frees the copies.
    """

    def __init__(self, model):
        import types

        import torch

        self.layers = [m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and LORA_MARK not in name and m.weight.dtype == torch.float32]
        # every copy first, then the layers: a failure halfway (memory) leaves no layer patched
        copies = [torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None) for layer in self.layers]
        for layer, copy in zip(self.layers, copies):
            layer.packed_weight = copy
            layer.forward = types.MethodType(_packed_forward, layer)
        self.bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in self.layers)

    def remove(self):
        for layer in self.layers:
            del layer.forward, layer.packed_weight  # the instance attributes: the class's forward is back
        self.layers, self.bytes = [], 0


def _packed_forward(layer, x):
    """``torch.nn.Linear.forward`` on the packed copy; with gradients on, on the weights themselves."""
    import torch

    if torch.is_grad_enabled():
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias, "none", [], "")
