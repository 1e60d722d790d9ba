"""Int8 decoding on CPU (`caption.py --quantize int8`): torch's dynamic quantization of the decoder's and the head's
Linear layers, behind an operator that `torch.compile` can call, so `--quantize int8 --compile` compiles the decode
step around the int8 matrix products.

Why torch's dynamic quantization and not torchao: torchao 0.18's dynamic int8 config on the same layers decoded the
trained real model (outputs/cnngemma-real) at 193 ms per new token at batch 1 on 2 CPU cores, against 44 ms with
torch's and 106 ms in fp32 (a 20-token caption / 20, 2026-12-07; results/real/README.md), and importing torchao makes
transformers print torch warnings on every command. Torch marks the API deprecated; the warnings it prints are about
that future.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import nn

from .errors import RunError

# fbgemm's packed int8 weights are a TorchScript object that dynamo cannot trace ("UserDefinedObjectVariable(Script-
# Object)"), so the compiled graph calls the operator below with an integer handle to them instead; each Int8Linear
# owns its entry and removes it when it is collected. The operator is defined with torch.library's low-level API:
# a torch.library.custom_op costs about 30 us more per call, 4 ms per token over the decoder's 127 products.
_PACKED: dict[int, torch.ScriptObject] = {}
_handles = itertools.count()
_library = torch.library.Library("cnngemma", "DEF")
_library.define("int8_linear(Tensor x, int handle, int out_features, bool reduce_range) -> Tensor")


def _int8_linear(x, handle, out_features, reduce_range):
    return torch.ops.quantized.linear_dynamic(x, _PACKED[handle], reduce_range=reduce_range)


_library.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("cnngemma::int8_linear")
def _(x, handle, out_features, reduce_range):
    return x.new_empty(*x.shape[:-1], out_features)


class Int8Linear(nn.Module):
    """A `torch.ao.nn.quantized.dynamic.Linear` (int8 weights per output channel, activations quantized on the fly)
    that scales each token's activations to a max-abs of 1 first and back after: fbgemm takes one activation range
    per tensor, and without this a prompt's outsized `<bos>` activations set the range for the image and prompt
    tokens too, and a batch's captions depend on their batch mates. On the trained real model's first 48 test
    images this made 27 greedy captions equal fp32's instead of 14, for about 1 ms per token. Inside torch.compile
    the product is `cnngemma::int8_linear`: the same numbers."""

    def __init__(self, quantized: torch.ao.nn.quantized.dynamic.Linear):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        # as torch's module: versions before 4 quantized activations over the full int8 range
        self.reduce_range = quantized.version is None or quantized.version >= 4
        weight, bias = quantized._packed_params._weight_bias()
        self.packed = torch.ops.quantized.linear_prepack(weight, None)  # the bias is added after the scaling
        self.register_buffer("bias", bias, persistent=False)
        self.handle = next(_handles)
        _PACKED[self.handle] = self.packed
        weakref.finalize(self, _PACKED.pop, self.handle, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        if torch.compiler.is_compiling():
            y = torch.ops.cnngemma.int8_linear(x / scale, self.handle, self.out_features, self.reduce_range)
        else:
            y = torch.ops.quantized.linear_dynamic(x / scale, self.packed, reduce_range=self.reduce_range)
        y = y * scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights per channel"


def quantize_int8(model):
    """Int8 weights, per output channel, in the decoder's and the head's Linear layers, with activations quantized
    on the fly; in place, CPU only, for inference, not for `save_pretrained`. The same captions eager or compiled:

        model = quantize_int8(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True))
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise RunError(
            f"quantize_int8: the model is on {device}, but int8 decoding runs on CPU only (torch's dynamic "
            "quantization has no kernels for other devices). Move it with model.cpu() first, or do not quantize."
        )
    # Dynamic int8 kernels take fp32 activations: a bf16 or fp16 checkpoint (from_pretrained keeps the saved dtype)
    # is widened first, which loses nothing.
    model.float()
    # The head gets its own int8 copy of the tied embedding matrix, the largest weight read at each step; the
    # input embeddings stay fp32.
    spec = {"model.language_model": per_channel_dynamic_qconfig, "lm_head": per_channel_dynamic_qconfig}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.ao.nn.quantized.dynamic.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
