"""Tiny random checkpoints in the real Hugging Face on-disk format, built offline.

They exercise every line of the loader and the engine without a model hub, and they
are the embedded default model of ``python -m sglite demo``.

    >>> from sglite.runtime.loading.tiny_model import build_tiny_model
    >>> path = build_tiny_model("llama")          # cached under ~/.cache/sglite
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines a tiny checkpoint; its hash names the cache directory."""

    family: str = "llama"
    """A ``model_type`` of the native registry (``sglite.runtime.models.MODEL_REGISTRY``)."""
    tokenizer: str = "bpe"
    """``bpe`` (byte-level, GPT-2 style) or ``sentencepiece`` (``▁`` and ``<0x..>`` byte fallback)."""
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    init_std: float = 0.5
    """Wide weights keep greedy argmax far from ties, so numerics comparisons are stable."""
    tie_word_embeddings: bool = False
    rope_scaling_llama3: bool = False
    seed: int = 0
    version: int = 3

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _training_corpus(limit_files: int = 60) -> list[str]:
    """Text already on every machine: the Python standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(stdlib.glob("*.py"))[:limit_files]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    # A little English and JSON so demos tokenize naturally.
    texts.append("The quick brown fox jumps over the lazy dog. " * 20)
    texts.append('{"name": "Alice", "age": 31, "city": "Paris", "email": "alice@example.com"} ' * 20)
    return texts


def build_tokenizer(kind: str, vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'sentencepiece'")
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    if kind == "sentencepiece":
        # As in Llama-2's tokenizer, the 256 byte-fallback pieces are ordinary vocabulary entries (not
        # special tokens, which decode(skip_special_tokens=True) would drop).
        data = json.loads(tok.to_str())
        vocab = dict(data["model"]["vocab"])
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
        tok.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    family: str = "llama",
    out_dir: str | os.PathLike | None = None,
    *,
    tokenizer: str = "bpe",
    **overrides,
) -> Path:
    """Build (once) a random-weight checkpoint of ``family`` and return its directory.

    Without ``out_dir`` it lives under ``$SGLITE_CACHE`` (default ``~/.cache/sglite``),
    named by a hash of the recipe, so a second call returns at once.
    """
    from sglite.runtime.models import MODEL_REGISTRY

    if family not in MODEL_REGISTRY:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}")
    recipe = TinyRecipe(family=family, tokenizer=tokenizer, **overrides)
    if out_dir is None:
        from sglite.runtime.loading.cache_dir import sglite_cache_dir

        out_dir = sglite_cache_dir() / f"tiny-{family}-{tokenizer}-{recipe.digest()}"
    out = Path(out_dir)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(recipe.tokenizer, recipe.vocab_size, tmp)
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=recipe.tie_word_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
    )
    if family == "qwen3":
        kwargs["head_dim"] = recipe.hidden_size // recipe.num_attention_heads
    if family == "mistral":
        kwargs["sliding_window"] = None
    if recipe.rope_scaling_llama3:
        kwargs["rope_theta"] = 500000.0
        kwargs["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
    config = AutoConfig.for_model(family, **kwargs)
    # A private RNG stream: building a checkpoint must not reseed the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, recipe.init_std)
                elif name.endswith("bias"):
                    param.normal_(0.0, 0.1)
                else:  # norm weights: near one, but not exactly, so a missing norm shows
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
