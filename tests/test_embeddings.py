"""Embeddings in process: BERT and decoder embedders against transformers' recipe, pooling read from the
folder, truncation and dimensions, and the engine surfaces (``Engine.encode``, embedding-only engines)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import sglite
from sglite.runtime.config import EngineConfig
from sglite.runtime.embedder import EmbeddingInputError, NotAGenerationModelError, NotAnEmbeddingModelError
from sglite.runtime.embedding_engine import EmbeddingEngine
from sglite.runtime.pooling import PoolingConfig, PoolingConfigError, read_pooling_config

VARIED_TEXTS = [
    "a cat",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Ünïcödé テキスト, emoji 😀 and accents: café, naïve.",
    "def f(x):\n    return x ** 2  # code",
    "1 2 3 4.5e6 -7 0x1F",
    "Paris is the capital of France.",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    from sglite.runtime.loading.default_model import default_embedding_model_path

    return str(default_embedding_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path) -> EmbeddingEngine:
    return sglite.Engine(minilm_path)


def sentence_transformers_recipe(path: str, texts: list[str], max_length: int = 256) -> torch.Tensor:
    """all-MiniLM-L6-v2's recipe with plain transformers: padded batch, mean over the attention mask, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def test_bert_folder_is_an_embedding_engine_without_a_flag(minilm):
    assert isinstance(minilm, EmbeddingEngine) and not minilm.is_generation
    assert minilm.embedder.pooling == PoolingConfig("mean", normalize=True, max_seq_length=256)
    with pytest.raises(NotAGenerationModelError, match="embedding model"):
        minilm.generate("hello", {"max_new_tokens": 2})


def test_minilm_matches_sentence_transformers_recipe(minilm, minilm_path):
    out = minilm.encode(VARIED_TEXTS)
    ours = torch.tensor([o["embedding"] for o in out])
    reference = sentence_transformers_recipe(minilm_path, VARIED_TEXTS)
    cosines = F.cosine_similarity(ours, reference)
    assert cosines.min().item() > 0.9999, cosines.tolist()
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(VARIED_TEXTS)), atol=1e-5)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [len(t) for t in minilm.tokenizer(VARIED_TEXTS)["input_ids"]]


def test_packing_does_not_change_a_vector(minilm):
    """One input alone, in a batch of mixed lengths, and split over several forwards: the same vector."""
    alone = torch.tensor(minilm.encode(VARIED_TEXTS[3])["embedding"])
    batched = torch.tensor(minilm.encode(VARIED_TEXTS)[3]["embedding"])
    assert torch.allclose(alone, batched, atol=1e-5)
    embedder = minilm.embedder
    many = [f"sentence number {i} " * (1 + i % 7) for i in range(60)]
    groups = embedder._forward_groups(sorted(len(t) for t in embedder.tokenize(many)))
    assert len(groups) > 1  # the batch really is split into several packed forwards
    vectors = embedder.embed(many).vectors
    singles = torch.cat([embedder.embed([t]).vectors for t in many[:5]])
    assert torch.allclose(vectors[:5], singles, atol=1e-5)


def test_token_ids_and_text_give_the_same_vector(minilm):
    ids = minilm.tokenizer("Paris is the capital of France.")["input_ids"]
    by_ids = minilm.encode(ids)["embedding"]
    by_text = minilm.encode("Paris is the capital of France.")["embedding"]
    assert torch.allclose(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-6)


def test_bad_inputs_raise_precise_errors(minilm):
    with pytest.raises(EmbeddingInputError, match=r"input\[1\] is empty"):
        minilm.encode(["ok", ""])
    with pytest.raises(EmbeddingInputError, match="at least one"):
        minilm.encode([])
    with pytest.raises(EmbeddingInputError, match="maximum of 256") as err:
        minilm.encode("word " * 400)
    assert err.value.param == "input"
    with pytest.raises(EmbeddingInputError, match="vocabulary"):
        minilm.encode([101, 10**6, 102])
    with pytest.raises(EmbeddingInputError, match="not trained for truncation") as err:
        minilm.encode("a cat", dimensions=64)
    assert err.value.param == "dimensions"
    with pytest.raises(EmbeddingInputError, match="truncate_prompt_tokens"):
        minilm.encode("a cat", truncate_prompt_tokens=10_000)


def test_truncate_prompt_tokens_keeps_the_head_and_special_tokens(minilm, minilm_path):
    long_text = "The quick brown fox jumps over the lazy dog. " * 60
    out = minilm.encode(long_text, truncate_prompt_tokens=-1)
    assert out["meta_info"]["prompt_tokens"] == 256
    reference = sentence_transformers_recipe(minilm_path, [long_text])  # sentence-transformers cuts at 256 too
    assert F.cosine_similarity(torch.tensor([out["embedding"]]), reference).item() > 0.9999
    short = minilm.encode(long_text, truncate_prompt_tokens=16)
    assert short["meta_info"]["prompt_tokens"] == 16
    assert F.cosine_similarity(torch.tensor([short["embedding"]]), sentence_transformers_recipe(minilm_path, [long_text], 16)).item() > 0.9999


def test_pooling_config_is_read_from_the_folder(tmp_path, minilm_path):
    folder = tmp_path / "st"
    shutil.copytree(minilm_path, folder)
    default = PoolingConfig("last")
    assert read_pooling_config(folder, default) == PoolingConfig("mean", True, 256)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize
    assert read_pooling_config(folder, default) == PoolingConfig("cls", False, 256)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(PoolingConfigError, match="pooling_mode_max_tokens"):
        read_pooling_config(folder, default)
    (folder / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(PoolingConfigError, match="Dense"):
        read_pooling_config(folder, default)
    assert read_pooling_config(tmp_path, default) == default  # no modules.json: the caller's default


def _reference_decoder_hidden(path, texts: list[str]) -> list[torch.Tensor]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    hidden = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            hidden.append(model(input_ids=ids).last_hidden_state[0])
    return hidden


def test_decoder_as_embedder_last_and_mean_pooling(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen3")
    texts = ["hello world", "a much longer sentence about embeddings and retrieval", "x y"]
    reference = _reference_decoder_hidden(path, texts)
    engine = sglite.Engine(str(path), is_embedding=True)
    assert isinstance(engine, EmbeddingEngine)
    last = torch.tensor([o["embedding"] for o in engine.encode(texts)])
    expected = F.normalize(torch.stack([h[-1] for h in reference]), dim=-1)
    assert F.cosine_similarity(last, expected).min().item() > 0.9999
    # a sentence-transformers folder around the same decoder: mean pooling, no normalisation
    folder = tmp_path / "mean"
    shutil.copytree(path, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    mean = torch.tensor([o["embedding"] for o in sglite.Engine(str(folder), is_embedding=True).encode(texts)])
    assert torch.allclose(mean, torch.stack([h.mean(0) for h in reference]), atol=1e-4, rtol=1e-4)


def test_dimensions_truncate_and_renormalise_on_a_matryoshka_model(tiny_model_factory, tmp_path):
    folder = tmp_path / "matryoshka"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [32, 64, 128]}))
    engine = sglite.Engine(str(folder), is_embedding=True)
    full = torch.tensor(engine.encode("hello world")["embedding"])
    cut = torch.tensor(engine.encode("hello world", dimensions=32)["embedding"])
    assert cut.shape == (32,) and torch.allclose(cut, F.normalize(full[:32], dim=0), atol=1e-6)
    with pytest.raises(EmbeddingInputError, match=r"one of \[32, 64, 128\]"):
        engine.encode("hello world", dimensions=48)


def test_generation_engine_embeds_only_with_an_embedding_model(llama_path, minilm_path):
    with sglite.Engine(str(llama_path), max_total_tokens=256) as plain:
        with pytest.raises(NotAnEmbeddingModelError, match="--embedding-model"):
            plain.encode("hello")
    with sglite.Engine(str(llama_path), max_total_tokens=256, embedding_model=minilm_path) as both:
        vector = both.encode("Paris is the capital of France.")["embedding"]
        reference = sentence_transformers_recipe(minilm_path, ["Paris is the capital of France."])
        assert F.cosine_similarity(torch.tensor([vector]), reference).item() > 0.9999
        out = both.generate("hello", {"max_new_tokens": 3, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 3


def test_embedding_options_are_checked_before_loading(minilm_path):
    with pytest.raises(ValueError, match="embedding_model goes next to a generation model"):
        EngineConfig(is_embedding=True, embedding_model=minilm_path)
    with pytest.raises(ValueError, match="embedding model itself"):
        sglite.Engine(minilm_path, embedding_model=minilm_path)


def test_concurrent_callers_with_and_without_truncation(tiny_model_factory, minilm):
    """Server worker threads call at once: each gets its own input's vector (forwards take turns over a decoder's
    scratch KV pool; tokenizer calls with and without truncation do not interleave)."""
    from concurrent.futures import ThreadPoolExecutor

    long_text = "The quick brown fox jumps over the lazy dog. " * 60
    expected = torch.tensor(minilm.encode(VARIED_TEXTS[6])["embedding"])

    def call(i: int) -> list[float]:
        if i % 2:
            return minilm.encode(long_text, truncate_prompt_tokens=32)["embedding"]
        return minilm.encode(VARIED_TEXTS[6])["embedding"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(32)))
    for vector in results[::2]:
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-5)
    assert all(len(v) == 384 for v in results)
    decoder = sglite.Engine(str(tiny_model_factory("qwen3")), is_embedding=True)
    texts = [f"text number {i} " * (1 + i % 5) for i in range(12)]
    alone = [decoder.encode(t)["embedding"] for t in texts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda t: decoder.encode(t)["embedding"], texts * 2))
    assert torch.allclose(torch.tensor(together), torch.tensor(alone * 2), atol=1e-5)


def test_bfloat16_and_int8_stay_close_to_the_float32_vectors(minilm, minilm_path):
    full = torch.tensor([o["embedding"] for o in minilm.encode(VARIED_TEXTS)])
    for options, floor in (({"dtype": "bfloat16"}, 0.999), ({"quantization": "int8"}, 0.995)):
        low = torch.tensor([o["embedding"] for o in sglite.Engine(minilm_path, **options).encode(VARIED_TEXTS)])
        assert F.cosine_similarity(low, full).min().item() > floor, options
