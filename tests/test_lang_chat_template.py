"""Chat templates turn by turn: prefix + content + suffix per turn must equal the full Jinja rendering."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglite.lang.chat_template import (
    ChatTemplateError,
    TokenizerChatTemplate,
    get_chat_template,
    match_chat_template,
)

# A BOS before the first turn and content trimmed (as Llama-3's template does).
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A default system turn when the conversation does not open with one (as Qwen2's template does).
DEFAULT_SYSTEM_STYLE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Only user/assistant alternation is allowed (as older Mistral templates do).
STRICT_ALTERNATION = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def base_tokenizer(llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_path)


def with_template(tokenizer, template: str):
    clone = copy.copy(tokenizer)
    clone.chat_template = template
    return clone


def render_turn_by_turn(template, messages) -> str:
    text, prior = "", []
    for m in messages:
        text += template.role_prefix(prior, m["role"]) + m["content"] + template.role_suffix(prior, m["role"])
        prior.append(m["role"])
    return text


conversations = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text("abc xyz", min_size=1, max_size=8).map(str.strip)),
    min_size=1,
    max_size=5,
).map(lambda turns: [{"role": r, "content": c or "x"} for r, c in turns])


@pytest.mark.parametrize("template_source", [None, DEFAULT_SYSTEM_STYLE, LLAMA3_STYLE])
@settings(max_examples=40, deadline=None)
@given(messages=conversations)
def test_turn_by_turn_equals_full_rendering(base_tokenizer, template_source, messages):
    tokenizer = base_tokenizer if template_source is None else with_template(base_tokenizer, template_source)
    template = TokenizerChatTemplate(tokenizer)
    assert render_turn_by_turn(template, messages) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_assistant_prefix_is_the_generation_prompt(base_tokenizer):
    tokenizer = with_template(base_tokenizer, LLAMA3_STYLE)
    template = TokenizerChatTemplate(tokenizer)
    messages = [{"role": "user", "content": "hi"}]
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_turn_by_turn(template, messages) + template.role_prefix(["user"], "assistant") == opened


def test_tiny_tokenizer_template_is_chatml(base_tokenizer):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert render_turn_by_turn(TokenizerChatTemplate(base_tokenizer), messages) == render_turn_by_turn(
        get_chat_template("chatml"), messages
    )


def test_template_that_refuses_a_role_order_says_what_to_do(base_tokenizer):
    template = TokenizerChatTemplate(with_template(base_tokenizer, STRICT_ALTERNATION))
    assert template.role_prefix([], "user") == "[INST] "
    with pytest.raises(ChatTemplateError, match="chat_template="):
        template.role_prefix([], "system")


def test_named_templates_and_matching():
    assert match_chat_template("/models/Meta-Llama-3-8B-Instruct").name == "llama-3"
    assert match_chat_template("Qwen/Qwen2.5-0.5B-Instruct").name == "qwen"
    assert match_chat_template("mistralai/Mistral-7B-Instruct-v0.3").name == "mistral"
    assert match_chat_template("some/unknown-model").name == "chatml"
    qwen = get_chat_template("qwen")
    assert qwen.role_prefix([], "user").startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert qwen.role_prefix(["user"], "user") == "<|im_start|>user\n"
    with pytest.raises(ChatTemplateError, match="known: chatml"):
        get_chat_template("vicuna")
