"""Chat templates: the text a chat turn is wrapped in, asked for one turn at a time.

``sgl.user(...)`` needs the template's prefix when the turn opens and its suffix when it closes,
while the turn's content may still be streaming from the model. Two sources:

* ``TokenizerChatTemplate`` renders the checkpoint's own Jinja template (``apply_chat_template``)
  with placeholder contents and reads the prefix/suffix off the result, so special cases such as
  a default system prompt or a BOS token before the first turn come out exactly as the model
  was trained. ``sgl.Runtime`` uses it.
* ``NamedChatTemplate`` is a fixed table (``chatml``, ``llama-3``, ``qwen``, ``mistral``) for
  remote backends, chosen from the model name (``match_chat_template``) or given explicitly.

    >>> t = get_chat_template("chatml")
    >>> t.role_prefix([], "user") + "hi" + t.role_suffix([], "user")
    '<|im_start|>user\\nhi<|im_end|>\\n'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The template cannot render this conversation (e.g. it forbids this order of roles)."""


@runtime_checkable
class ChatTemplate(Protocol):
    """What the interpreter asks of a chat template; ``prior_roles`` are the turns already closed."""

    name: str
    stop_str: tuple[str, ...]
    """Extra stop strings for generation inside a turn (remote backends whose EOS text may leak)."""

    def role_prefix(self, prior_roles: Sequence[str], role: str) -> str: ...

    def role_suffix(self, prior_roles: Sequence[str], role: str) -> str: ...


@dataclass(frozen=True)
class NamedChatTemplate:
    """A fixed prefix/suffix per role, plus an optional default system turn."""

    name: str
    """What ``get_chat_template`` and ``chat_template=`` arguments call it."""
    roles: dict[str, tuple[str, str]]
    """role -> (prefix, suffix)."""
    default_system_prompt: str | None = None
    """Inserted as a system turn when the conversation opens with another role."""
    stop_str: tuple[str, ...] = field(default_factory=tuple)

    def role_prefix(self, prior_roles: Sequence[str], role: str) -> str:
        prefix = self._pair(role)[0]
        if not prior_roles and role != "system" and self.default_system_prompt is not None:
            sys_prefix, sys_suffix = self._pair("system")
            return sys_prefix + self.default_system_prompt + sys_suffix + prefix
        return prefix

    def role_suffix(self, prior_roles: Sequence[str], role: str) -> str:
        return self._pair(role)[1]

    def _pair(self, role: str) -> tuple[str, str]:
        if role not in self.roles:
            raise ChatTemplateError(f"chat template {self.name!r} has no role {role!r}; roles: {', '.join(self.roles)}")
        return self.roles[role]


def _chatml_roles() -> dict[str, tuple[str, str]]:
    return {role: (f"<|im_start|>{role}\n", "<|im_end|>\n") for role in ROLES}


_NAMED = {
    "chatml": NamedChatTemplate("chatml", _chatml_roles(), stop_str=("<|im_end|>",)),
    "qwen": NamedChatTemplate(
        "qwen", _chatml_roles(), default_system_prompt="You are a helpful assistant.", stop_str=("<|im_end|>",)
    ),
    "llama-3": NamedChatTemplate(
        "llama-3",
        {role: (f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>") for role in ROLES},
        stop_str=("<|eot_id|>",),
    ),
    "mistral": NamedChatTemplate(
        "mistral",
        {
            "system": ("[SYSTEM_PROMPT] ", "[/SYSTEM_PROMPT]"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", "</s>"),
        },
        stop_str=("</s>",),
    ),
}


def get_chat_template(name: str) -> NamedChatTemplate:
    """A named template: ``chatml``, ``qwen``, ``llama-3`` or ``mistral``."""
    if name not in _NAMED:
        raise ChatTemplateError(f"unknown chat template {name!r}; known: {', '.join(sorted(_NAMED))}")
    return _NAMED[name]


def match_chat_template(model_name: str) -> NamedChatTemplate:
    """Guess the template from a model name or path; ChatML when nothing matches."""
    name = model_name.lower()
    if re.search(r"llama[-_ ]?3", name):
        return _NAMED["llama-3"]
    if "qwen" in name:
        return _NAMED["qwen"]
    if "mistral" in name or "mixtral" in name:
        return _NAMED["mistral"]
    return _NAMED["chatml"]


def resolve_chat_template(template: str | ChatTemplate | None, model_name: str) -> ChatTemplate:
    """An explicit template (object or name) wins; otherwise the one matching ``model_name``."""
    if template is None:
        return match_chat_template(model_name)
    if isinstance(template, str):
        return get_chat_template(template)
    return template


class TokenizerChatTemplate:
    """Prefix/suffix read off the tokenizer's own Jinja chat template.

    Contents are placeholders, so templates that trim or inspect content still render, and the
    result depends only on the sequence of roles (cached per sequence).
    """

    stop_str: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any, name: str = "tokenizer") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"tokenizer {name!r} has no chat template; pass chat_template='chatml' (or another name)")
        self.tokenizer = tokenizer
        self.name = name
        self._cache: dict[tuple, str] = {}

    @staticmethod
    def _placeholder(index: int) -> str:
        return f"SGLITEPLACEHOLDER{index}X"

    def _render(self, roles: Sequence[str], add_generation_prompt: bool = False) -> str:
        messages = [{"role": role, "content": self._placeholder(i)} for i, role in enumerate(roles)]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises TemplateError (and templates raise their own) for bad role orders
            raise ChatTemplateError(
                f"the model's chat template cannot render roles {list(roles)}: {exc}; "
                "reorder the turns or pass chat_template='chatml' (or another name)"
            ) from exc

    def role_prefix(self, prior_roles: Sequence[str], role: str) -> str:
        key = ("prefix", tuple(prior_roles), role)
        if key not in self._cache:
            self._cache[key] = self._compute_prefix(list(prior_roles), role)
        return self._cache[key]

    def role_suffix(self, prior_roles: Sequence[str], role: str) -> str:
        key = ("suffix", tuple(prior_roles), role)
        if key not in self._cache:
            full = self._render([*prior_roles, role])
            marker = self._placeholder(len(prior_roles))
            self._cache[key] = full[full.index(marker) + len(marker):]
        return self._cache[key]

    def _compute_prefix(self, prior: list[str], role: str) -> str:
        prior_text = self._render(prior) if prior else ""
        if role == "assistant" and prior:
            # The generation prompt is what the model saw before its own turns in training.
            opened = self._render(prior, add_generation_prompt=True)
            if opened.startswith(prior_text) and len(opened) > len(prior_text):
                return opened[len(prior_text):]
        full = self._render([*prior, role])
        head = full[: full.index(self._placeholder(len(prior)))]
        if head.startswith(prior_text):
            return head[len(prior_text):]
        # Not prefix-stable (the template rewrites earlier turns): keep what follows the
        # previous turn's content, minus the suffix already emitted when that turn closed.
        previous = self._placeholder(len(prior) - 1)
        between = head[head.index(previous) + len(previous):]
        emitted = self.role_suffix(prior[:-1], prior[-1])
        return between[len(emitted):] if between.startswith(emitted) else between
