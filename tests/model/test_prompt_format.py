"""Prompt formats: the chat template for instruction-tuned models, a plain document for base models."""

from __future__ import annotations

import pytest

from node.model.engine import Engine
from node.model.prompt_format import ANSWER, DOCUMENT_STOPS, DocumentFormat
from tests.tiny_models import write_tiny_gguf

# The shape of Gemma 3's instruction-tuned template (system text folded into the first user turn).
GEMMA_IT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
PLAYBOOK = "ADVICE DESK\n\nQuestion: Cache or not?\nAnswer: Measure first."
TURN_1 = [{"role": "system", "content": PLAYBOOK}, {"role": "user", "content": "Which database?"}]
TURN_2 = [*TURN_1, {"role": "assistant", "content": "PostgreSQL."}, {"role": "user", "content": "Why?"}]


def test_document_renders_playbook_then_question_and_answer_cue():
    text = DocumentFormat().render(TURN_2)
    assert text == (
        f"{PLAYBOOK}\n\nQuestion: Which database?\nAnswer: PostgreSQL.\n\nQuestion: Why?\n{ANSWER}"
    )


def test_document_turn_extends_the_previous_one():
    """The rendered prompt of turn N is a prefix of turn N+1's: the agent's cache serves it."""
    document = DocumentFormat()
    assert document.render(TURN_2).startswith(document.render(TURN_1))


def test_document_stops_at_the_next_turn_marker():
    assert "\nQuestion:" in DOCUMENT_STOPS and "\n\n" in DOCUMENT_STOPS


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    base, tuned = root / "base.gguf", root / "tuned.gguf"
    write_tiny_gguf(base)
    write_tiny_gguf(tuned, chat_template=GEMMA_IT_TEMPLATE)
    cache = root / "models"
    return Engine.load(str(base), lambda m: None, cache), Engine.load(str(tuned), lambda m: None, cache)


def test_base_model_reads_a_document(engines):
    base, _ = engines
    assert not base.info.instruction_tuned
    assert base.render_chat(TURN_1).endswith("Question: Which database?\nAnswer:")
    tokens = base.encode_chat(TURN_1)
    assert tokens[0] == base.bos_token_id and tokens.count(base.bos_token_id) == 1
    assert base.chat_stop == DOCUMENT_STOPS


def test_instruction_tuned_model_keeps_its_template(engines):
    _, tuned = engines
    assert tuned.info.instruction_tuned
    text = tuned.render_chat(TURN_1)
    assert text.startswith("<bos><start_of_turn>user\nADVICE DESK")
    assert text.endswith("<start_of_turn>model\n")
    assert "Question: Which database?" not in text
    assert tuned.chat_stop == ()
