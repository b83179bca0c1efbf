"""The environment is read once, into ``EngineConfig`` at engine start; inner modules take its values."""

from __future__ import annotations

import pytest

import sglite
from sglite.constraints import ConstraintError
from sglite.runtime.config import ENVIRONMENT, EngineConfig, environment_options


def test_each_variable_sets_its_option_and_an_option_given_in_code_wins():
    environ = {
        "SGLITE_NATIVE_KERNELS": "0",
        "SGLITE_PACKED_LINEAR": "onednn",
        "SGLITE_MAX_REGEX_SIZE": "2000",
        "SGLITE_MAX_REGEX_LENGTH": "300",
    }
    config = EngineConfig.from_options(environ)
    assert (config.native_kernels, config.packed_linear, config.max_regex_size, config.max_regex_length) == (False, "onednn", 2000, 300)
    assert set(environment_options(environ)) == set(ENVIRONMENT.values())
    assert EngineConfig.from_options(environ, packed_linear="auto", max_regex_size=10).packed_linear == "auto"
    defaults = EngineConfig.from_options({})
    assert (defaults.native_kernels, defaults.packed_linear, defaults.max_regex_size) == (True, "auto", None)
    assert EngineConfig.from_options({"SGLITE_PACKED_LINEAR": "0"}).packed_linear == "off"


@pytest.mark.parametrize(
    "variable, value",
    [("SGLITE_NATIVE_KERNELS", "maybe"), ("SGLITE_PACKED_LINEAR", "panels2"), ("SGLITE_MAX_REGEX_SIZE", "8k")],
)
def test_an_unreadable_variable_is_an_error_naming_it(variable, value):
    with pytest.raises(ValueError, match=f"{variable}={value!r}"):
        EngineConfig.from_options({variable: value})


def test_bad_option_values_are_refused():
    with pytest.raises(ValueError, match="packed_linear"):
        EngineConfig(packed_linear="panels")
    with pytest.raises(ValueError, match="max_regex_size"):
        EngineConfig(max_regex_size=0)


def test_regex_limits_are_read_at_engine_start(llama_path, monkeypatch):
    monkeypatch.setenv("SGLITE_MAX_REGEX_SIZE", "20")
    with sglite.Engine(str(llama_path), device="cpu", max_total_tokens=1024, grammar_backend="outlines") as engine:
        monkeypatch.delenv("SGLITE_MAX_REGEX_SIZE")  # later changes do not reach a running engine
        with pytest.raises(ConstraintError, match="over the limit of 20"):
            engine.generate("x", {"regex": "a{50}", "max_new_tokens": 2})
        out = engine.generate("x", {"regex": "a{5}", "max_new_tokens": 8})
        assert out["text"] == "aaaaa"
