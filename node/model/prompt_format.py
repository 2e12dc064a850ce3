"""How a conversation becomes prompt tokens: the chat template, or a plain document for base models.

An instruction-tuned model learned its chat template, so messages are rendered with it. A base
model (Gemma 3 270M from PyPI: its GGUF has no chat template) never saw one: rendered that way it
continues by repeating the instructions. For it, a conversation is a document the model continues
well: the system text (a skill's playbook of worked examples) and the turns as

    Question: <user text>
    Answer: <assistant text>

ending with `Question: <text>\\nAnswer:`; generation stops at the next turn marker. Both formats
keep each rendered turn a prefix of the next one, so an agent's cache serves a conversation's
history and only the new turn is prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

QUESTION = "Question:"
ANSWER = "Answer:"
# The base model ends its answer by starting the next question (on a new line, or sampled straight
# after its last word: "Orange, Blue and YellowQuestion:") or a new section. ("Answer:" is no stop:
# without worked examples the model may open with "\nAnswer:", which would end the reply empty.)
DOCUMENT_STOPS = (f"\n{QUESTION}", QUESTION, "\n\n", "\n---")


class TextTokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


@dataclass(frozen=True)
class ChatTemplateFormat:
    """The model's own chat template (the template writes the BOS token itself)."""

    tokenizer: TextTokenizer
    kind: str = "chat-template"
    stop: tuple[str, ...] = ()  # the template's end-of-turn tokens are stop tokens already
    add_bos: bool = False
    repetition_penalty: float | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)


@dataclass(frozen=True)
class DocumentFormat:
    """A plain-text Question/Answer document for base models (BOS added by the encoder)."""

    kind: str = "document"
    stop: tuple[str, ...] = DOCUMENT_STOPS
    add_bos: bool = True
    # A base model continuing a document falls into loops ("a cache, and a cache, ..."); a mild
    # penalty on the tokens of its own reply keeps it moving (llama.cpp's classic default is 1.1).
    repetition_penalty: float | None = 1.15

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        parts = [_document_part(m["role"], str(m["content"]).strip()) for m in messages]
        text = "".join(parts)
        if add_generation_prompt:
            text += ANSWER
        return text


def _document_part(role: str, content: str) -> str:
    if role == "user":
        return f"{QUESTION} {content}\n"
    if role == "assistant":
        return f"{ANSWER} {content}\n\n"
    return f"{content}\n\n"  # system text: the playbook, or a note between turns


def prompt_format(tokenizer: TextTokenizer, instruction_tuned: bool) -> ChatTemplateFormat | DocumentFormat:
    return ChatTemplateFormat(tokenizer) if instruction_tuned else DocumentFormat()
