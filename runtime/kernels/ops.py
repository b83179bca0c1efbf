"""The schemas and fake (meta) kernels of sglite's C++ ops, defined once for the library and every wrapper.

The C++ library (:mod:`~sglite.runtime.kernels.library`) registers only CPU kernels for these schemas; the fake
kernels give ``torch.compile`` each op's output shape without running it. Wrappers and the library both import
this module, so neither imports the other's users.

    >>> import torch
    >>> from sglite.runtime.kernels import ops
    >>> torch.ops.sglite.greedy_pick.default._schema.name
    'sglite::greedy_pick'
"""

from __future__ import annotations

import torch

torch.library.define("sglite::greedy_pick", "(Tensor logits) -> Tensor")
torch.library.define(
    "sglite::paged_decode_attention",
    "(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache, Tensor kv_index, Tensor kv_lens, "
    "float scaling) -> Tensor",
)
torch.library.define("sglite::silu_and_mul", "(Tensor gate_up) -> Tensor")
torch.library.define("sglite::rotary", "(Tensor x, Tensor cos, Tensor sin) -> Tensor")
torch.library.define("sglite::panel_linear", "(Tensor x, Tensor panels, int out_features, Tensor? bias) -> Tensor")
torch.library.define(
    "sglite::ggml_quant_matmul", "(Tensor x, Tensor blocks, int qtype, int out_features, int level) -> Tensor"
)
torch.library.define("sglite::ggml_dequantize", "(Tensor blocks, Tensor? rows, int qtype, int cols, int level) -> Tensor")
torch.library.define("sglite::ggml_quantize_ref", "(Tensor x, int qtype, int level) -> Tensor")


@torch.library.register_fake("sglite::greedy_pick")
def _(logits):
    return logits.new_empty(logits.shape[0], dtype=torch.long)


@torch.library.register_fake("sglite::paged_decode_attention")
def _(q, k_new, v_new, k_cache, v_cache, kv_index, kv_lens, scaling):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


@torch.library.register_fake("sglite::silu_and_mul")
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.register_fake("sglite::rotary")
def _(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.register_fake("sglite::panel_linear")
def _(x, panels, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("sglite::ggml_quant_matmul")
def _(x, blocks, qtype, out_features, level):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("sglite::ggml_dequantize")
def _(blocks, rows, qtype, cols, level):
    n = blocks.shape[0] if rows is None else rows.numel()
    return blocks.new_empty(n, cols, dtype=torch.float32)


@torch.library.register_fake("sglite::ggml_quantize_ref")
def _(x, qtype, level):
    raise NotImplementedError("ggml_quantize_ref makes test data eagerly; it is not traced")
