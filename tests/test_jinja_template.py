"""A snapshot's own chat template: found, compared with Qwen2.5-Instruct's, rendered with Jinja as
transformers renders it, and used by the server only where it differs from the built-in one."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_chat_template import _conversation, _tools

from qwen_jax.chat_template import ChatTemplateError, normalize_messages, render_chat
from qwen_jax.jinja_template import (
    JinjaChatTemplate,
    TemplateConfigError,
    choose_renderer,
    is_official,
    official_template,
    snapshot_template,
)

# Qwen2-7B-Instruct's template: another default system prompt than Qwen2.5's, no tools.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _transformers(source, messages, tools=None, add_generation_prompt=True,
                  continue_final_message=False, **variables):
    from transformers.utils import chat_template_utils as utils

    rendered, _ = utils.render_jinja_template(
        [messages], tools=tools, chat_template=source, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, **variables)
    return rendered[0]


@pytest.mark.needs_shared
def test_the_shipped_template_is_the_official_one(shared_reference):
    reference = shared_reference / "qwen2.5-instruct-chat-template.jinja"
    assert official_template() == reference.read_text(encoding="utf-8")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_conversation(), tools=_tools(), add_generation_prompt=st.booleans(),
       continue_final_message=st.booleans())
def test_the_official_template_through_jinja_is_the_builtin_renderer(
        messages, tools, add_generation_prompt, continue_final_message):
    """Two renderers of one template: the Python one (chat_template.py) and the Jinja path run on
    the shipped template; each checks the other, without ../shared."""
    jinja = JinjaChatTemplate(official_template())
    assert jinja(messages, tools, add_generation_prompt, continue_final_message) == render_chat(
        messages, tools, add_generation_prompt, continue_final_message)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_conversation(), tools=_tools(), add_generation_prompt=st.booleans())
def test_other_templates_render_as_transformers_renders_them(messages, tools,
                                                             add_generation_prompt):
    # A template using what transformers passes besides messages: tools, the special tokens,
    # tojson's options, loop controls, raise_exception (never reached here).
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'nobody' %}"
        "{{ raise_exception('no') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function | tojson(indent=1) }}"
        "{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}\n"
        "    {% if add_generation_prompt %}\n[assistant]\n    {% endif %}\n{{ eos_token }}"
    )  # the indented blocks on lines of their own: what trim_blocks and lstrip_blocks remove
    variables = {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    plain = normalize_messages(messages)
    for template in (QWEN2_TEMPLATE, source):
        if template is QWEN2_TEMPLATE and tools:
            continue
        ours = JinjaChatTemplate(template, variables)(messages, tools, add_generation_prompt)
        assert ours == _transformers(template, plain, tools, add_generation_prompt, **variables)


def test_qwen2_template_differs_from_the_builtin_one():
    messages = [{"role": "user", "content": "hi"}]
    rendered = JinjaChatTemplate(QWEN2_TEMPLATE)(messages)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered != render_chat(messages)


def test_continue_final_message_as_transformers_does():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    ours = JinjaChatTemplate(QWEN2_TEMPLATE)(messages, add_generation_prompt=False,
                                             continue_final_message=True)
    assert ours.endswith("<|im_start|>assistant\nOnce upon")
    assert ours == _transformers(QWEN2_TEMPLATE, messages, add_generation_prompt=False,
                                 continue_final_message=True)
    # A template that rewrites the content cannot be continued: a request error, not a guess.
    upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ChatTemplateError) as e:
        JinjaChatTemplate(upper)(messages, add_generation_prompt=False,
                                 continue_final_message=True)
    assert e.value.param == "continue_final_message"


def test_names_and_tool_call_ids_reach_the_template():
    source = ("{% for m in messages %}{{ m.role }}:{{ m.name or '-' }}:"
              "{{ m.tool_call_id or '-' }};{% endfor %}")
    messages = [
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
    ]
    assert JinjaChatTemplate(source)(messages) == "user:ann:-;assistant:-:-;tool:-:c1;"


def test_template_failures_are_request_errors_and_bad_jinja_a_config_error():
    refuses = "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="no users"):
        JinjaChatTemplate(refuses)([{"role": "user", "content": "x"}])
    broken = "{{ messages[0]['content'] + 1 }}"
    with pytest.raises(ChatTemplateError, match="TypeError"):
        JinjaChatTemplate(broken)([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # messages are checked as for the built-in renderer
        JinjaChatTemplate(QWEN2_TEMPLATE)([{"role": "robot", "content": "x"}])
    with pytest.raises(TemplateConfigError, match="not valid Jinja"):
        JinjaChatTemplate("{% for m in messages %}")
    sandboxed = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses what a template escapes by
    with pytest.raises(ChatTemplateError):
        JinjaChatTemplate(sandboxed)([{"role": "user", "content": "x"}])


def _snapshot(tmp_path, template=None, *, jinja_file=None, extra=None):
    config = {"eos_token": "<|im_end|>", "bos_token": None, **(extra or {})}
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja_file)
    return tmp_path


def test_where_a_snapshot_keeps_its_template(tmp_path):
    assert snapshot_template(_snapshot(tmp_path)) is None
    assert snapshot_template(_snapshot(tmp_path, "A")) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert snapshot_template(_snapshot(tmp_path, named)) == "D"
    assert snapshot_template(_snapshot(tmp_path, "A", jinja_file="J")) == "J"  # the file wins
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(TemplateConfigError, match="chat_template must be"):
        snapshot_template(_snapshot(tmp_path, 42))


def test_the_server_renders_the_builtin_template_unless_the_snapshot_has_another(tmp_path):
    official = official_template()
    assert is_official("\n" + official.strip() + "\n") and not is_official(QWEN2_TEMPLATE)
    for template in (None, official):
        renderer, note = choose_renderer(_snapshot(tmp_path, template))
        assert renderer is render_chat and "built in" in note
    renderer, note = choose_renderer(_snapshot(tmp_path, QWEN2_TEMPLATE,
                                               extra={"bos_token": {"content": "<s>"}}))
    assert isinstance(renderer, JinjaChatTemplate) and renderer.source == QWEN2_TEMPLATE
    assert renderer.variables == {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    assert "snapshot's own" in note
    assert choose_renderer(tmp_path, "builtin")[0] is render_chat
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    renderer, note = choose_renderer(tmp_path, str(path))
    assert renderer([{"role": "user", "content": "hi"}]) == "hi" and str(path) in note
    with pytest.raises(TemplateConfigError, match="cannot read"):
        choose_renderer(tmp_path, str(tmp_path / "missing.jinja"))


def test_bad_jinja_names_its_file_and_line(tmp_path):
    """Where the template came from (the --chat-template file, the snapshot's
    chat_template.jinja or tokenizer_config.json) and the line Jinja stopped at."""
    bad = "line one\n{% for m in messages %}\n{{ m.content }"
    path = tmp_path / "mine.jinja"
    path.write_text(bad)
    with pytest.raises(TemplateConfigError, match=f"^{re.escape(str(path))}, line 3: not valid"):
        choose_renderer(tmp_path, str(path))
    with pytest.raises(TemplateConfigError, match=r"tokenizer_config\.json's chat_template, "
                                                   r"line 3: not valid Jinja"):
        choose_renderer(_snapshot(tmp_path, bad))
    with pytest.raises(TemplateConfigError, match=r"chat_template\.jinja, line 3: not valid"):
        choose_renderer(_snapshot(tmp_path, jinja_file=bad))


def test_a_saved_tokenizer_carries_the_official_template(qwen_tokenizer, tmp_path):
    """The demo snapshot works with transformers' apply_chat_template, as a real one does."""
    from transformers import AutoTokenizer

    from qwen_jax.tokenizer import save_tokenizer

    save_tokenizer(qwen_tokenizer, tmp_path)
    assert is_official(snapshot_template(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=True) == render_chat(messages)
