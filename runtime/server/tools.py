"""Tool calling for /v1/chat/completions: prompts that offer tools, and calls constrained to their schemas.

A call is never free text that might not parse: its JSON is generated under the json_schema
constraint of ``{"name": <const>, "arguments": <the function's parameters schema>}`` (``anyOf`` over
the offered tools), so a returned call always parses and validates against its function's schema.

- ``tool_choice="required"`` or a named function: the call is generated at once, constrained.
- ``"auto"``: the model first writes freely and stops at the format's call marker; if it reached the
  marker, the call is then generated constrained from there (the prefix is a cache hit).
- ``"none"``: tools are described in the prompt (as OpenAI does) but no call is made.

Formats: ``hermes`` (ChatML, Qwen 2/2.5/3, SmolLM: ``<tool_call>{"name", "arguments"}</tool_call>``)
and ``llama3`` (Llama 3.1+: the reply is ``{"name", "parameters"}``). The tokenizer's own chat template
renders ``tools=`` and tool turns when it supports them; otherwise the tools are described in a system
message and tool turns are rendered in the hermes way.

    >>> call_schema([{"name": "f", "parameters": {"type": "object"}}], "hermes")["properties"]["name"]
    {'const': 'f'}
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

HERMES = "hermes"
LLAMA3 = "llama3"


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes a call: what opens it, and the key its arguments go under."""

    name: str
    marker: str
    """Text that opens a call in the reply (``auto`` stops there, then constrains the call)."""
    arguments_key: str


FORMATS = {
    HERMES: ToolFormat(HERMES, "<tool_call>", "arguments"),
    LLAMA3: ToolFormat(LLAMA3, '{"name"', "parameters"),
}


def tool_format(chat_template: str | None) -> ToolFormat:
    """The call format a chat template's model family was trained on (hermes unless it is Llama 3's)."""
    template = chat_template or ""
    if "<|python_tag|>" in template or "ipython" in template:
        return FORMATS[LLAMA3]
    return FORMATS[HERMES]


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the tokenizer's template renders a ``tools`` argument itself."""
    return bool(chat_template) and "tools" in chat_template


def functions_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``function`` objects of OpenAI ``tools`` entries, parameters defaulting to an empty object."""
    functions = []
    for tool in tools:
        function = dict(tool["function"])
        function.setdefault("parameters", {"type": "object", "properties": {}})
        functions.append(function)
    return functions


def call_schema(functions: list[dict[str, Any]], fmt: ToolFormat | str) -> dict[str, Any]:
    """JSON schema of one call to any of ``functions`` (the constraint a call is generated under)."""
    key = (FORMATS[fmt] if isinstance(fmt, str) else fmt).arguments_key
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def system_prompt(functions: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """Tool instructions for templates that cannot render ``tools`` themselves."""
    listing = "\n".join(json.dumps({"type": "function", "function": f}) for f in functions)
    if fmt.name == LLAMA3:
        how = 'To call a function, reply with only a JSON object {"name": <function name>, "parameters": <arguments object>}.'
    else:
        how = (
            "To call a function, reply with a JSON object inside <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
        )
    return f"You can call these functions:\n{listing}\n{how}"


def render_conversation(
    messages: list[dict[str, Any]], functions: list[dict[str, Any]], fmt: ToolFormat, native: bool
) -> list[dict[str, Any]]:
    """Messages ready for ``apply_chat_template``: with a native template, as OpenAI sends them (tool
    calls' arguments as objects); otherwise tool calls and results become hermes-style text and the
    tools are described in the system message."""
    rendered = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if native:
            if calls:
                message["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _json_or_text(c["function"]["arguments"])}} for c in calls
                ]
            rendered.append(message)
            continue
        if message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"})
        elif calls:
            text = "".join(
                f"<tool_call>\n{json.dumps({'name': c['function']['name'], fmt.arguments_key: _json_or_text(c['function']['arguments'])})}\n</tool_call>"
                for c in calls
            )
            rendered.append({"role": "assistant", "content": (message.get("content") or "") + text})
        else:
            rendered.append({"role": message["role"], "content": message.get("content") or ""})
    if not native and functions:
        instructions = system_prompt(functions, fmt)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + instructions}
        else:
            rendered.insert(0, {"role": "system", "content": instructions})
    return rendered


def _json_or_text(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def parse_call(text: str, fmt: ToolFormat) -> dict[str, Any]:
    """OpenAI's ``tool_calls`` entry for a constrained call's JSON text (it parses by construction)."""
    call = json.loads(text)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call[fmt.arguments_key])},
    }


def chosen_functions(functions: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
    """The functions a call may target under ``tool_choice`` (a named choice must name an offered tool)."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(f['name'] for f in functions)})")
        return named
    return functions
