"""Regex and choice constraints: whatever the sampler picks, the decoded text full-matches."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglite.constraints import (
    BOOL_REGEX,
    FLOAT_REGEX,
    INT_REGEX,
    STRING_REGEX,
    ConstraintError,
    build_logits_processor,
    make_backend,
    regex_for_choices,
    regex_for_type,
)
from sglite.constraints.regex_syntax import normalize_regex
from constraint_simulation import simulate_decode

VOCAB = 2100  # wider than the tokenizer's 2048, as a model's padded embedding can be

REGEXES = [
    r"\d{4}-\d{2}-\d{2}",
    r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?",
    r"[a-z0-9._]{1,12}@[a-z]{2,8}\.(com|org|net)",
    r"\(\d{3}\) \d{3}-\d{4}",
    r"\+\d{1,3} \d{3} \d{3} \d{4}",
    r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    r"-?\d{1,6}\.\d{1,3}",
    r"[+-]?\d\.\d{2}e[+-]\d{2}",
    r"(cat|dog|bird)s?",
    r"(ab){2,5}",
    r"[A-Z][a-z]{2,8}",
    r"[^\n\"]{3,10}",
    r"[äöü]{2,4}",
    r"こんにちは|你好",
    r"(café|naïve) ✓",
    r"#[0-9a-fA-F]{6}",
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    r"https?://[a-z]{3,10}\.(com|io)(/[a-z0-9]{1,8}){0,3}",
    r"Hello, world!",
    r"colou?r",
    r"((a|b)(c|d)){1,3}",
    r"[a-z]{1,5}( [a-z]{1,5}){1,3}",
    r"line1\nline2: \d{1,3}",
    r"\[\d{1,2}\] \(\*\) \$\d+\.\d\d",
    r"\d{5}(-\d{4})?",
    r"def [a-z_]{1,10}\(\):",
    r"(one|two|three|\d{1,2})",
    r"[A-Z]{2}\d{2} ?[A-Z]{4}",
    r"(a|b)*c",
    r"(yes|no|)",
    r"[\u0400-\u04ff]{1,4}",
    r"\p{Greek}{1,3}",
]


def generate(tokenizer, seed: int, temperature: float, max_steps: int = 200, **constraint) -> str:
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", **constraint)
    result = simulate_decode(
        proc, VOCAB, seed=seed, temperature=temperature, max_steps=max_steps,
        eos_token_ids={tokenizer.eos_token_id},
    )
    assert result.finished, f"no accepting state within {max_steps} steps: {tokenizer.decode(result.token_ids)!r}"
    return tokenizer.decode(result.token_ids)


def python_regex(regex: str) -> str:
    """Rust's \\p{Greek} spelled for Python's re."""
    return regex.replace(r"\p{Greek}", "[\u0370-\u03ff\U0001d200-\U0001d24f\u1f00-\u1fff\U00010140-\U0001018f\U0001d200-\U0001d245\u1d26-\u1d2a\u1d5d-\u1d61\u1d66-\u1d6a\u1dbf\u2126\uab65]")


@pytest.mark.parametrize("regex", REGEXES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_text_fullmatches(tokenizer, regex, temperature):
    for seed in range(2):
        text = generate(tokenizer, seed, temperature, regex=regex)
        assert re.fullmatch(python_regex(regex), text), (regex, text)


@pytest.mark.parametrize("regex", REGEXES[::3] + [r"[äöü]{2,4}", r"こんにちは|你好", r"(café|naïve) ✓"])
def test_sentencepiece_tokenizer(sp_tokenizer, regex):
    for seed in range(2):
        text = generate(sp_tokenizer, seed, 1.0, regex=regex)
        assert re.fullmatch(python_regex(regex), text), (regex, text)


def test_digit_class_is_ascii(tokenizer):
    # Rust's \d is every Unicode digit; the compiler narrows it to [0-9].
    for seed in range(6):
        text = generate(tokenizer, seed, 1.0, regex=r"\d{6}")
        assert re.fullmatch(r"[0-9]{6}", text), text


def test_anchors_are_optional(tokenizer):
    assert re.fullmatch(r"ab\d", generate(tokenizer, 0, 1.0, regex=r"^ab\d$"))


@pytest.mark.parametrize(
    "choices", [["yes", "no"], ["Paris", "London", "New York", "São Paulo"], ["a.b", "a*b", "(x)"], ["same", "same"]]
)
def test_choices(tokenizer, choices):
    for seed in range(4):
        assert generate(tokenizer, seed, 1.0, choices=choices) in choices


def test_regex_for_choices_escapes_literals():
    rx = regex_for_choices(["1+1", "[x]"])
    assert re.fullmatch(rx, "1+1") and re.fullmatch(rx, "[x]")
    assert not re.fullmatch(rx, "11") and not re.fullmatch(rx, "x")


@pytest.mark.parametrize(
    "regex, good, bad",
    [
        (INT_REGEX, ["0", "-12", "345"], ["01", "+1", "1.0"]),
        (FLOAT_REGEX, ["0", "-1.5", "2e10", "3.25E-3"], ["1.", ".5", "1e"]),
        (BOOL_REGEX, ["True", "False"], ["true", "1"]),
        (STRING_REGEX, ['""', '"a b"', r'"say \"hi\""'], ['"', "'a'", '"a\nb"']),
    ],
)
def test_typed_regexes(regex, good, bad):
    assert all(re.fullmatch(regex, s) for s in good)
    assert not any(re.fullmatch(regex, s) for s in bad)


def test_regex_for_type():
    assert regex_for_type(int) == INT_REGEX and regex_for_type(str) == STRING_REGEX
    with pytest.raises(ConstraintError, match="list"):
        regex_for_type(list)


@pytest.mark.parametrize("regex", [INT_REGEX, FLOAT_REGEX, BOOL_REGEX])
def test_typed_regexes_sample(tokenizer, regex):
    for seed in range(3):
        text = generate(tokenizer, seed, 1.0, max_steps=400, regex=regex)
        assert re.fullmatch(regex, text), text


@pytest.mark.parametrize(
    "regex, fragment",
    [
        ("(ab", "position 0"),
        ("[z-a]", "position 1"),
        ("a{2,1}", "position 2"),
        ("ab(?=c)", "lookahead at position 2"),
        (r"(a)\1", "backreference at position 3"),
        (r"a\bb", "word boundary"),
        ("a^b", "anchor ^ at position 1"),
    ],
)
def test_invalid_regex_names_position(tokenizer, regex, fragment):
    with pytest.raises(ConstraintError, match=re.escape(fragment)) as info:
        build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=regex)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "exactly one"),
        ({"regex": "a", "choices": ["a"]}, "exactly one"),
        ({"choices": []}, "empty"),
        ({"choices": ["a", 1]}, "strings"),
        ({"choices": "abc"}, "list"),
        ({"regex": "a", "whitespace_pattern": " "}, "json_schema"),
        ({"regex": 5}, "string"),
    ],
)
def test_bad_arguments(tokenizer, kwargs, fragment):
    with pytest.raises(ConstraintError, match=fragment):
        build_logits_processor(tokenizer, VOCAB, backend="outlines", **kwargs)


def test_mask_allows_eos_only_when_accepting(tokenizer):
    eos = tokenizer.eos_token_id
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=r"ab(cd)?", jump_forward=False)
    logits = torch.zeros(VOCAB)
    proc.mask_logits(logits)
    assert logits[eos] == float("-inf")
    assert torch.isinf(logits[len(tokenizer):]).all()  # ids past the tokenizer never appear
    allowed = torch.nonzero(logits == 0).flatten().tolist()
    assert allowed == proc.allowed_token_ids()
    assert all(b"abcd".startswith(proc.fsm.vocabulary.token_bytes[t]) for t in allowed)
    for token_id in tokenizer.encode("ab", add_special_tokens=False):
        proc.accept_token(token_id)
    assert not proc.is_finished()  # "cd" may still follow
    logits = torch.zeros(VOCAB)
    proc.mask_logits(logits)
    assert logits[eos] == 0
    assert logits[tokenizer.convert_tokens_to_ids("c")] == 0
    proc.accept_token(eos)
    assert proc.is_finished()


@pytest.mark.parametrize("regex, text", [("ab|abcd", "abcd"), ("ab(cd)?", "abcd"), (r"\d+(\.\d+)?", "12.5")])
def test_continuations_after_a_complete_match_survive(tokenizer, regex, text):
    # outlines-core alone drops a token that ends one byte after a complete match (see CompiledFSM).
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=regex, jump_forward=False)
    for char in text:
        assert not proc.is_finished()
        assert tokenizer.convert_tokens_to_ids(char) in proc.allowed_token_ids(), (regex, char)
        proc.accept_token(tokenizer.convert_tokens_to_ids(char))
    assert proc.fsm.is_final(proc.state)


def test_unbalanced_group_is_rejected_not_wrapped(tokenizer):
    with pytest.raises(ConstraintError, match="position 1"):
        build_logits_processor(tokenizer, VOCAB, backend="outlines", regex="a)|(b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_keeps_dtype_and_allowed_values(tokenizer, dtype):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=r"[0-9]{2}")
    logits = torch.randn(VOCAB).to(dtype)
    original = logits.clone()
    proc.mask_logits(logits)
    allowed = proc.allowed_token_ids()
    assert logits.dtype == dtype
    assert torch.equal(logits[allowed], original[allowed])
    assert torch.isinf(logits).sum() == VOCAB - len(allowed)


def test_finishes_when_nothing_can_follow(tokenizer):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex="abc", jump_forward=False)
    for token_id in tokenizer.encode("abc", add_special_tokens=False):
        assert not proc.is_finished()
        proc.accept_token(token_id)
    assert proc.is_finished() and proc.violation is None


def test_token_outside_mask_finishes_with_violation(tokenizer):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=r"\d+")
    proc.accept_token(tokenizer.encode("x", add_special_tokens=False)[0])
    assert proc.is_finished() and "not allowed" in proc.violation


def test_extra_eos_ids_act_as_eos(tokenizer):
    extra = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex="a+", eos_token_ids=[extra])
    logits = torch.zeros(VOCAB)
    proc.mask_logits(logits)
    assert logits[extra] == float("-inf")
    proc.accept_token(tokenizer.encode("a", add_special_tokens=False)[0])
    logits = torch.zeros(VOCAB)
    proc.mask_logits(logits)
    assert logits[extra] == 0 and logits[tokenizer.eos_token_id] == 0
    proc.accept_token(extra)
    assert proc.is_finished()


def test_compiles_and_masks_are_cached(tokenizer):
    regex = r"cache-me-\d{3}"
    backend = make_backend("outlines", tokenizer, VOCAB)
    first = build_logits_processor(tokenizer, VOCAB, backend=backend, regex=regex)
    before = backend.cache_info()["compiled"]
    second = build_logits_processor(tokenizer, VOCAB, backend=backend, regex=regex)
    after = backend.cache_info()["compiled"]
    assert second.fsm is first.fsm
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert 0 < after["bytes"] <= after["budget_bytes"]  # charged in bytes
    other = make_backend("outlines", tokenizer, VOCAB)  # a second engine's backend shares nothing
    assert build_logits_processor(tokenizer, VOCAB, backend=other, regex=regex).fsm is not first.fsm
    bias = first.fsm.logit_bias(first.state, VOCAB, torch.device("cpu"), torch.float32)
    assert first.fsm.logit_bias(first.state, VOCAB, torch.device("cpu"), torch.float32) is bias
    assert set(torch.nonzero(bias == 0).flatten().tolist()) == set(first.allowed_token_ids())


# ---- property: random small regexes from a grammar ----------------------------------------

_atoms = st.one_of(
    st.sampled_from(list("abcxyz019 ") + [r"\.", r"\-", "é", "ß", "中"]),
    st.sampled_from(["[a-c]", "[0-9]", "[xyz]", "[^a-z\n]", r"\d", "[äöü]"]),
)


def _regexes():
    def extend(inner):
        quantified = st.tuples(inner, st.sampled_from(["", "?", "{2}", "{1,3}", "{0,2}"])).map(
            lambda t: f"(?:{t[0]}){t[1]}" if t[1] else t[0]
        )
        concat = st.lists(quantified, min_size=1, max_size=3).map("".join)
        alternation = st.lists(concat, min_size=2, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")")
        return st.one_of(concat, alternation)

    return st.recursive(_atoms, extend, max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regex=_regexes(), seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 1.0]))
def test_random_regexes_fullmatch(tokenizer, regex, seed, temperature):
    text = generate(tokenizer, seed, temperature, regex=regex)
    assert re.fullmatch(regex, text), (regex, text)


def _spellable(text: str) -> bool:
    # Surrogates have no UTF-8; plane-16 private use is reserved for the accept sentinel.
    return all(not 0xD800 <= ord(c) <= 0xDFFF and ord(c) < 0x100000 for c in text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), regex=_regexes())
@pytest.mark.slow
def test_every_matching_string_is_reachable(tokenizer, data, regex):
    """Completeness: the tokenizer's own split of any matching string walks the FSM to acceptance."""
    text = data.draw(st.from_regex(normalize_regex(regex), fullmatch=True).filter(_spellable))
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=regex, jump_forward=False)
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        assert token_id in proc.allowed_token_ids(), (regex, text, token_id)
        proc.accept_token(token_id)
    assert proc.fsm.is_final(proc.state) and proc.violation is None
