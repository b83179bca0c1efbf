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
