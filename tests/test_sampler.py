"""The sampler's filters, as pure functions over a batch of logits."""

from __future__ import annotations

import pytest
import torch

from sglite.runtime.sampler import filter_probs, sample
from sglite.runtime.sampling_params import SamplingParams


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    return {int(sample(logits.clone(), [params], [gen])[0]) for _ in range(n)}


def test_filters_keep_only_what_they_allow():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert draws(logits, SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4}
    assert draws(logits, SamplingParams(temperature=1.0, top_k=2)) <= {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.5)) == {0}
    assert draws(logits, SamplingParams(temperature=1.0, min_p=0.3)) <= {0, 1}
    assert draws(logits, SamplingParams(temperature=0.0)) == {0}


def test_filter_probs_is_batched_per_row():
    probs = torch.softmax(torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]), -1)
    out = filter_probs(probs, torch.tensor([1, 3]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert out[0].nonzero().flatten().tolist() == [0]
    assert torch.equal(out[1], probs[1])


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    alone = sample(logits[1:2].clone(), [p], [torch.Generator().manual_seed(7)])
    batched = sample(logits.clone(), [p, p, p], [torch.Generator().manual_seed(s) for s in (1, 7, 3)])
    assert int(alone[0]) == int(batched[1])


def test_engine_and_http_protocol_share_one_range_per_sampling_parameter():
    import pydantic

    from sglite.runtime.sampling_params import LIMITS, SamplingParams
    from sglite.runtime.server.protocol import SamplingRequest

    for name, allowed in LIMITS.items():
        too_high = allowed.high + 0.5
        with pytest.raises(ValueError, match=name):
            SamplingParams.from_dict({name: too_high})
        with pytest.raises(pydantic.ValidationError, match=name):
            SamplingRequest(**{name: too_high})
        SamplingParams.from_dict({name: allowed.high})
        SamplingRequest(**{name: allowed.high})
    # One deliberate difference: OpenAI's top_p=0 means "the most likely token", sent to the engine as top_k=1.
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0.0})
    assert SamplingRequest(top_p=0.0).top_p == 0.0


# ---- numerical safety (issue 9): any accepted parameter, any logits ----------------------------------

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglite.runtime.sampler import NoCandidateError, apply_penalties, sanitize_logits

INF, NAN = float("inf"), float("nan")


def test_tiny_temperatures_sample_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    for temperature in (1e-38, 5e-38, 1e-30, 1e-6):
        assert draws(logits, SamplingParams(temperature=temperature), n=20) == {1}


def test_a_1e40_repetition_penalty_leaves_a_valid_distribution():
    logits = torch.tensor([[1.0, 2.0, -3.0, 0.5]])
    sp = SamplingParams(temperature=1.0, repetition_penalty=1e-40)
    apply_penalties(logits, [sp], [torch.tensor([0, 1, 2])], [torch.tensor([], dtype=torch.int64)])
    assert torch.isinf(logits[0, :2]).all()  # 1 / 1e-40 overflows float32: the naive softmax would be nan
    assert draws(logits, sp, n=50) <= {0, 1}  # the limit of the distribution: the penalised-up tokens


def test_nan_and_inf_logits_never_poison_a_row():
    logits = torch.tensor([[NAN, 1.0, 2.0], [INF, INF, 0.0], [-INF, NAN, 0.5]])
    p = SamplingParams(temperature=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(30):
        ids = sample(logits.clone(), [p, p, p], gens).tolist()
        assert ids[0] in (1, 2) and ids[1] in (0, 1) and ids[2] == 2


def test_a_row_with_no_candidate_is_reported_not_sampled():
    logits = torch.tensor([[-INF, -INF], [1.0, 0.0]])
    assert sanitize_logits(logits.clone()).tolist() == [False, True]
    with pytest.raises(NoCandidateError):
        sample(logits, [SamplingParams(temperature=1.0)] * 2, [None, None])


finite_or_not = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from([INF, -INF, NAN]))


@settings(max_examples=300, deadline=None)
@given(
    row=st.lists(finite_or_not, min_size=2, max_size=12),
    temperature=st.one_of(st.just(0.0), st.floats(1e-45, 2.0)),
    top_p=st.floats(1e-45, 1.0),
    top_k=st.integers(-1, 12),
    min_p=st.floats(0.0, 1.0),
    repetition_penalty=st.floats(1e-45, 100.0),
)
def test_any_accepted_parameters_yield_an_allowed_token(row, temperature, top_p, top_k, min_p, repetition_penalty):
    sp = SamplingParams.from_dict(
        {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty}
    )
    logits = torch.tensor([row], dtype=torch.float32)
    apply_penalties(logits, [sp], [torch.tensor([0, 1])], [torch.tensor([], dtype=torch.int64)])
    values = logits[0].tolist()
    # +inf entries (a penalty can make them) take all the mass; otherwise any finite entry may be drawn
    allowed = [v == INF for v in values] if INF in values else [not math.isnan(v) and v != -INF for v in values]
    if not any(allowed):
        with pytest.raises(NoCandidateError):
            sample(logits, [sp], [torch.Generator().manual_seed(0)])
        return
    token = int(sample(logits, [sp], [torch.Generator().manual_seed(0)])[0])
    assert allowed[token]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_pick_argmax_with_ties_to_the_lowest_id(dtype):
    torch.manual_seed(0)
    logits = torch.randn(6, 1000).to(dtype)
    logits[2, [17, 400, 999]] = 50.0  # a three-way tie for the maximum
    logits[4, 3] = float("nan")  # a non-finite row takes the sanitizing path: nan is never chosen
    want = logits.float().nan_to_num(nan=float("-inf")).argmax(-1)
    got = sample(logits.clone(), [SamplingParams(temperature=0.0)] * 6, [None] * 6)
    assert got.tolist() == want.tolist() and int(got[2]) == 17


def test_lenient_is_the_earlier_spelling_of_not_strict():
    """Clients of the earlier release sent ``lenient``; it maps onto ``strict`` rather than becoming a 400."""
    assert SamplingParams.from_dict({"lenient": False}).strict is True
    assert SamplingParams.from_dict({"lenient": True}).strict is False
    assert SamplingParams.from_dict({"lenient": True, "strict": False}).strict is False
    with pytest.raises(ValueError, match="'lenient' must be a bool"):
        SamplingParams.from_dict({"lenient": "yes"})
    with pytest.raises(ValueError, match="not both"):
        SamplingParams.from_dict({"lenient": True, "strict": True})
