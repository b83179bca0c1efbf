"""sglite's frontend language, SGLang-compatible: programs written for ``import sglang as sgl``
run unchanged with ``import sglite as sgl``.

    >>> import sglite as sgl
    >>> @sgl.function
    ... def qa(s, question):
    ...     s += sgl.user(question)
    ...     s += sgl.assistant(sgl.gen("answer", max_tokens=32))
    >>> sgl.set_default_backend(sgl.Runtime())        # doctest: +SKIP
    >>> qa.run(question="Why is the sky blue?")["answer"]   # doctest: +SKIP
"""

from __future__ import annotations

from sglite.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    separate_reasoning,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from sglite.lang.backends.base import Backend, BackendNotSetError, get_default_backend, set_default_backend
from sglite.lang.backends.openai import OpenAI
from sglite.lang.backends.runtime import Runtime
from sglite.lang.backends.runtime_endpoint import RuntimeEndpoint
from sglite.lang.backends.server_args import UnsupportedServerArgError
from sglite.lang.global_config import GlobalConfig, global_config
from sglite.lang.chat_template import ChatTemplate, ChatTemplateError, get_chat_template
from sglite.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sglite.lang.ir import LangError
from sglite.lang.notebook import display_stream
from sglite.lang.program import Program
from sglite.lang.schema_regex import build_regex_from_object
from sglite.lang.state import ProgramState, ProgramStateGroup

greedy = greedy_token_selection
"""Short alias of ``greedy_token_selection``."""

__all__ = [
    # programs
    "function",
    "Program",
    "ProgramState",
    "ProgramStateGroup",
    # primitives
    "gen",
    "gen_int",
    "gen_string",
    "select",
    "image",
    "video",
    "separate_reasoning",
    "build_regex_from_object",
    "system",
    "user",
    "assistant",
    "system_begin",
    "system_end",
    "user_begin",
    "user_end",
    "assistant_begin",
    "assistant_end",
    # select methods
    "token_length_normalized",
    "greedy_token_selection",
    "greedy",
    "unconditional_likelihood_normalized",
    "ChoicesSamplingMethod",
    "ChoicesDecision",
    # backends
    "Backend",
    "Runtime",
    "RuntimeEndpoint",
    "OpenAI",
    "set_default_backend",
    "get_default_backend",
    "flush_cache",
    "get_server_info",
    "global_config",
    "GlobalConfig",
    "UnsupportedServerArgError",
    # chat templates, notebooks, errors
    "ChatTemplate",
    "get_chat_template",
    "display_stream",
    "LangError",
    "ChatTemplateError",
    "BackendNotSetError",
]
