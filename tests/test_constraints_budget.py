"""The compile budget: hostile constraints fail fast with a message naming the culprit, and
constraints that used to blow up outlines-core's DFA (JSON strings with maxLength) compile fast."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from sglite.constraints import ConstraintError, build_logits_processor
from sglite.constraints.regex_budget import MAX_REGEX_SIZE, check_regex_budget, regex_size
from sglite.constraints.regex_syntax import exclude_sentinel_plane
from constraint_simulation import simulate_decode

VOCAB = 2100


class HugeBio(BaseModel):
    name: str = Field(max_length=20)
    bio: str = Field(max_length=100_000)


HOSTILE = [
    pytest.param({"regex": "a{20000}"}, "repetition {20000} at position 1", id="long-count"),
    pytest.param({"regex": r"\w{1,3000}"}, "repetition {1,3000} at position 2", id="unicode-class"),
    pytest.param({"regex": "(a{100}){100}"}, "repetition {100} at position 8", id="nested-counts"),
    pytest.param({"regex": "(?:[a-z]+ ?){1,500}"}, "split into a different number", id="ambiguous-count"),
    pytest.param({"regex": ".*a.{40}"}, "follows a loop", id="exponential"),
    pytest.param({"regex": "(?x)" + r'"(?:[^"\\]|\\["\\]){0,40}"'}, "drop the (?x)", id="verbose-unanchored"),
    pytest.param({"regex": "x" * 200_000}, "200,000 characters, over", id="long-text"),
    pytest.param({"json_schema": {"type": "string", "maxLength": 100_000}}, "maxLength=100000 at (root)",
                 id="schema-maxLength"),
    pytest.param({"json_schema": HugeBio}, "maxLength=100000 at /properties/bio", id="pydantic-max_length"),
    pytest.param({"json_schema": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                                             "maxItems": 100}, "maxItems": 100}},
                 "maxItems=100", id="schema-nested-maxItems"),
    pytest.param({"json_schema": {"type": "integer", "maximum": 10**1000}}, "more than 400 digits",
                 id="schema-huge-bound"),
    pytest.param({"choices": [f"{i:05d}" + "x" * 100 for i in range(10_000)]}, "choices: 10,000 distinct",
                 id="choices"),
]


@pytest.mark.parametrize("constraint, fragment", HOSTILE)
def test_hostile_constraints_fail_fast(tokenizer, constraint, fragment, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("the automaton was built: the budget must refuse before any compile work")

    monkeypatch.setattr("sglite.constraints.compiler.Index", no_compile)
    with pytest.raises(ConstraintError) as info:
        build_logits_processor(tokenizer, VOCAB, backend="outlines", **constraint)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_message_says_what_to_change():
    with pytest.raises(ConstraintError) as info:
        check_regex_budget(r"\w{1,3000}")
    message = str(info.value)
    assert f"over the limit of {MAX_REGEX_SIZE:,} (SGLITE_MAX_REGEX_SIZE)" in message
    assert "lower the count" in message and "[A-Za-z0-9_]" in message


def test_limit_can_be_lowered_per_call():
    check_regex_budget("a{50}")
    with pytest.raises(ConstraintError, match="over the limit of 10"):
        check_regex_budget("a{50}", max_size=10)


@pytest.mark.parametrize(
    "constraint",
    [
        # The unanchored half of outlines-core's DFA made this exponential: maxLength 18 took 20 s.
        {"json_schema": {"type": "string", "maxLength": 300}},
        {"regex": "[ab]{5000}"},  # quadratic before: ~1 s
        {"regex": r'"[^"]{0,500}"'},
    ],
)
def test_large_but_cheap_constraints_compile_fast(tokenizer, constraint):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", **constraint)
    # The anchored compile has one state per position of the pattern; the unanchored blow-up tracked
    # every offset a match could start at (quadratic or exponential states, hence the compile time).
    assert len(proc.fsm.index.get_transitions()) <= regex_size(proc.regex) + 8
    result = simulate_decode(proc, VOCAB, seed=0, max_steps=40, eos_token_ids={tokenizer.eos_token_id})
    assert proc.violation is None
    if result.finished:
        assert re.fullmatch(proc.regex, tokenizer.decode(result.token_ids))


@pytest.mark.parametrize(
    "regex, size",
    [
        ("[0-9]{4}-[0-9]{2}", 7),
        ("こんにちは", 15),  # three UTF-8 bytes each
        (r'[^"]', 7),  # one-byte, two-byte, three-byte and four-byte lead states
        ("(a{100}){100}", 10_000),
        ("a{10,}", 10),
        ("(?:a|ab){10}", 20),  # parsed as a(?:b)?; each repetition starts with "a": count readable
        ("(?:[a-z]+ ?){1,10}", 200),  # "ab" is one repetition or two: count squared
        ('(?:,"[a-z]*"){50}', 200),  # a quoted string is its own delimiter
        (".*: [0-9]{1,40}", 1609),  # the loop dies at ":", so only the count is squared
        ("[ab]*a[ab]{10}", 1026),  # must remember which of the last 10 offsets held an "a"
    ],
)
def test_regex_size(regex, size):
    assert regex_size(regex) == size


def test_rust_only_syntax_is_estimated():
    assert regex_size(r"\p{Greek}{1,3}") == 3 * regex_size(r"\w")
    assert regex_size(r"\x{41}{3}") == 3
    assert regex_size("(?<name>a)(?i)b") == 2
    # Python cannot parse this; every count is charged as if nested in every other.
    assert regex_size(r"a{2}(?#x)b{3}(") >= 6


@pytest.mark.parametrize(
    "regex, expected",
    [
        (r'"[^"]*"', r'"[[^"]--[\x{100000}-\x{10FFFF}]]*"'),
        ("a.b", r"a[^\n\x{100000}-\x{10FFFF}]b"),
        ("(?s:.).", r"(?s:[^\x{100000}-\x{10FFFF}])[^\n\x{100000}-\x{10FFFF}]"),
        (r"\W[\]a]", r"[\W--[\x{100000}-\x{10FFFF}]][[\]a]--[\x{100000}-\x{10FFFF}]]"),
        ("[[:alpha:]&&[^x]]", r"[[[:alpha:]&&[^x]]--[\x{100000}-\x{10FFFF}]]"),
        (r"\\.", r"\\[^\n\x{100000}-\x{10FFFF}]"),
        ("(?x) a . # [", None),
        ("[unclosed", None),
    ],
)
def test_exclude_sentinel_plane(regex, expected):
    assert exclude_sentinel_plane(regex) == expected


CONFINED = [r'"(?:[^"\\]|\\["\\n])*"', r"a.{0,3}b", r"(?s)x.y", r"[^a-c]{1,3}\W?", r"\S+\s\D", r"(?i)[^a]b"]


@pytest.mark.parametrize("regex", CONFINED)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet='ab"\\n\n xyAB1é_-', max_size=8))
@pytest.mark.slow
def test_confined_fsm_accepts_what_python_matches(tokenizer, regex, text):
    """The sentinels and the plane-16 rewrite change nothing a tokenizer can spell."""
    fsm = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=regex).fsm
    state: int | None = fsm.initial_state
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        state = fsm.next_state(state, token_id) if state is not None else None
    accepted = state is not None and fsm.is_final(state)
    assert accepted == bool(re.fullmatch(regex, text)), (regex, text)
