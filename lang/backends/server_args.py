"""SGLang's server arguments (``sgl.Runtime(model_path=..., mem_fraction_static=..., ...)``) as engine options.

Each SGLang ``ServerArgs`` name a program may pass to ``Runtime`` is either mapped to what means the
same here, accepted because it changes nothing in one in-process engine (``port``, ``disable_cuda_graph``),
or refused with an error naming it: nothing is silently dropped.

    >>> server_args_to_engine_options({"context_length": 2048, "schedule_policy": "fcfs", "log_level": "error"})
    ({'context_length': 2048, 'schedule_policy': 'fcfs'}, {'log_level': 'error'})
    >>> try:
    ...     server_args_to_engine_options({"tp_size": 2})
    ... except UnsupportedServerArgError as exc:
    ...     print(exc)
    tp_size=2: tensor parallelism is not implemented (one device per engine); use tp_size=1
"""

from __future__ import annotations

from typing import Any

SAME_NAME = (
    "context_length",
    "chunked_prefill_size",
    "max_running_requests",
    "max_total_tokens",
    "disable_radix_cache",
    "random_seed",
    "device",
    "num_threads",
    "jump_forward",
    "enable_torch_compile",
    "torch_compile_max_bs",
    "is_embedding",
    "embedding_model",
)
"""Engine options SGLang spells the same way (``num_threads``/``jump_forward`` are sglite's own)."""

RUNTIME_ARGS = ("log_level", "mem_fraction_static", "tokenizer_path", "chat_template", "served_model_name", "dtype")
"""Handled by ``Runtime`` itself (logging, pool sizing, tokenizer location, chat template, model name)."""

NO_OP_ARGS = {
    "port": "the engine runs in this process; there is no server to listen",
    "host": "the engine runs in this process; there is no server to listen",
    "launch_timeout": "the engine is ready when Runtime() returns",
    "trust_remote_code": "supported architectures are built in; no remote code is run",
    "disable_cuda_graph": "CUDA graphs are not used",
    "cuda_graph_max_bs": "CUDA graphs are not used",
    "log_requests": "requests are not logged",
    "show_time_cost": "timings are in each result's meta_info",
    "enable_metrics": "metrics are served by `python -m sglite serve`",
    "skip_server_warmup": "there is no warm-up",
    "watchdog_timeout": "the step loop has no watchdog",
    "stream_interval": "every token is streamed",
    "load_format": "safetensors and GGUF are detected from the files",
}
"""SGLang arguments that are no-ops in one in-process engine: accepted and ignored."""

DEFAULT_ONLY = {
    "tp_size": (1, "tensor parallelism is not implemented (one device per engine); use tp_size=1"),
    "dp_size": (1, "data parallelism is not implemented; run several servers behind a load balancer"),
    "pp_size": (1, "pipeline parallelism is not implemented"),
    "ep_size": (1, "expert parallelism is not implemented"),
    "nnodes": (1, "multi-node serving is not implemented"),
    "node_rank": (0, "multi-node serving is not implemented"),
    "quantization": (None, "quantized weights are not implemented"),
    "kv_cache_dtype": ("auto", "the KV cache uses the model's dtype"),
    "speculative_algorithm": (None, "speculative decoding is not implemented"),
    "lora_paths": (None, "LoRA adapters are not implemented"),
    "skip_tokenizer_init": (False, "the engine always tokenizes (prompts may still be token ids)"),
    "attention_backend": (None, "attention is the engine's own (SDPA)"),
    "grammar_backend": (None, "constraints use the engine's own grammar backend"),
    "revision": (None, "models load from a local path only"),
}
"""SGLang arguments accepted only at their default value (anything else is refused, saying why)."""

SCHEDULE_POLICIES = ("lpm", "fcfs")
DTYPES = {"auto": None, "float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


class UnsupportedServerArgError(ValueError):
    """A ``Runtime(...)`` argument that SGLang accepts but this engine cannot honour (the message names it)."""


def server_args_to_engine_options(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split SGLang server arguments into ``(engine options, Runtime-level options)``; refuse the rest."""
    engine: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in args.items():
        if name in SAME_NAME:
            engine[name] = value
        elif name == "schedule_policy":
            if value not in SCHEDULE_POLICIES:
                problems.append(f"schedule_policy={value!r}: only {' and '.join(SCHEDULE_POLICIES)} are implemented")
            engine[name] = value
        elif name == "dtype":
            if value not in DTYPES:
                problems.append(f"dtype={value!r}: use one of {', '.join(DTYPES)}")
            elif DTYPES[value] is not None:
                engine["dtype"] = DTYPES[value]
        elif name in RUNTIME_ARGS:
            runtime[name] = value
        elif name in NO_OP_ARGS:
            continue
        elif name in DEFAULT_ONLY:
            default, why = DEFAULT_ONLY[name]
            if value != default and not (default is None and value in ("", "auto")):
                problems.append(f"{name}={value!r}: {why}")
        else:
            problems.append(f"{name}: not an option of this engine (engine options: {', '.join(SAME_NAME + RUNTIME_ARGS)})")
    if problems:
        raise UnsupportedServerArgError("; ".join(problems))
    return engine, runtime


def pool_tokens_for_fraction(model_path: str, fraction: float, dtype: str | None, device: str | None) -> int:
    """SGLang's ``mem_fraction_static`` as a KV pool size: the tokens whose KV fits, next to the weights,
    in ``fraction`` of the device's total memory (the GPU's, or the host's RAM on CPU)."""
    import torch

    from sglite.runtime.loading.memory import load_config, max_kv_tokens

    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise UnsupportedServerArgError(f"mem_fraction_static={fraction!r}: give a fraction in (0, 1)")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda":
        total = torch.cuda.mem_get_info(target)[1]
    else:
        total = _total_host_memory()
    config = load_config(model_path)
    tokens = max_kv_tokens(config, int(total * fraction), dtype or ("bfloat16" if target.type == "cuda" else "float32"))
    if tokens < 2:
        raise UnsupportedServerArgError(
            f"mem_fraction_static={fraction}: {fraction:.0%} of {total / 2**30:.1f} GiB does not hold the weights and a KV cache"
        )
    return tokens


def _total_host_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
