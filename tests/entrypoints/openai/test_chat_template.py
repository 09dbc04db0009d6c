"""The server's chat-template renderer: the same text as HF's `apply_chat_template` (SmolLM2's
template and a tool-using one), and the limits that stop a template from blowing up."""

from __future__ import annotations

import pytest
from jinja2 import TemplateError

from jpaged.checkpoint.sources import GGUFSource
from jpaged.entrypoints.openai.chat_template import ChatTemplateRenderer, TemplateLimitError

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Bye", "name": None}],
]
# The features chat templates of the Hub use: tools as JSON, namespace(), dict(), loop controls,
# raise_exception, the generation tag, special tokens as variables.
TOOL_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}{{ bos_token }}"
    "{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif -%}"
    "{%- for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}[{{ m.role }}:{{ ns.n }}]{{ m.content }}{% endif %}{% endfor -%}"
    "{%- if add_generation_prompt %}{{ dict(a=1).a }}>{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "paint", "description": "ünïcode",
                                           "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return GGUFSource(smollm2_path).load_tokenizer()


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatTemplateRenderer(tokenizer, max_chars=128 * 81)


def test_renders_what_apply_chat_template_renders(tokenizer, renderer):
    source = renderer.default_template(with_tools=False)
    for chat in CHATS:
        for add in (True, False):
            assert renderer.render_sync(source, chat, add_generation_prompt=add) == \
                tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add)
        assert renderer.render_sync(source, chat, add_generation_prompt=False,
                                    continue_final_message=True) == \
            tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    ours = renderer.render_sync(TOOL_TEMPLATE, CHATS[1], add_generation_prompt=True, tools=TOOLS)
    assert ours == tokenizer.apply_chat_template(CHATS[1], chat_template=TOOL_TEMPLATE,
                                                 tools=TOOLS, tokenize=False,
                                                 add_generation_prompt=True)
    assert ours.startswith("<|im_start|><tools>") and ours.endswith("1>")


def test_limits(renderer):
    chat = CHATS[0]
    for template, error, fragment in [
            ("{{ 'hello ' * 500000 }}", TemplateLimitError, "built a value of 3000000"),
            ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
             "{% set ns.s = ns.s + ns.s %}{% endfor %}", TemplateLimitError, "built a value"),
            ("{{ 7 ** 100000 }}", TemplateLimitError, "built a value"),
            ("{% for i in range(100000) %}0123456789{% endfor %}", TemplateLimitError,
             "longer than 10368 characters"),
            ("{% for i in range(10**6) %}{% endfor %}", OverflowError, "range too big"),
            ("{{ lipsum(10**6) }}", TemplateError, "'lipsum' is undefined"),
            ("{{ ''.__class__.__mro__[1].__subclasses__() }}", TemplateError, "is unsafe")]:
        with pytest.raises(error, match=fragment):
            renderer.render_sync(template, chat, add_generation_prompt=True)
    with pytest.raises(ValueError, match="does not appear in the rendered chat"):
        renderer.render_sync("{{ messages[0].role }}", chat, add_generation_prompt=False,
                             continue_final_message=True)
