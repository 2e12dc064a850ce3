"""Text <-> token ids and chat templates, straight from a model folder's `tokenizer.json`.

`tokenizers` loads a 262k-entry vocabulary in about a second, where transformers' AutoTokenizer
takes several; chat templates are rendered with jinja2's sandbox, as transformers does.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from node.errors import ModelSpecError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return template


# Markup tokens a reply may carry that the API layers read (tool calls, reasoning): kept in text.
VISIBLE_MARKUP = frozenset({"<|python_tag|>", "<tool_call>", "</tool_call>", "<think>", "</think>"})
# Another modality's markers, which a GGUF types as ordinary added tokens (user-defined, like
# Gemma's `<b>` or its runs of newlines): a model answering in text has no use for them.
_MEDIA_MARKER = re.compile(r"<[^<>\s]*(image|audio|video)[^<>\s]*>|\[multimodal\]")


def _hidden_ids(tokenizer) -> frozenset[int]:
    """Added tokens that are markup, not text: special ones (`<bos>`, `<unused12>`) except
    `VISIBLE_MARKUP`, and media markers (Gemma's `<start_of_image>`). A base model emits them now
    and then; in a reply's text they are noise."""
    return frozenset(
        i
        for i, token in tokenizer.get_added_tokens_decoder().items()
        if (token.special and token.content not in VISIBLE_MARKUP) or _MEDIA_MARKER.fullmatch(token.content)
    )


def _raise(message: str):
    raise ModelSpecError(f"chat template error: {message}")


class TextTokenizer:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelSpecError(f"{folder} has no tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.chat_template = _chat_template(folder, config)
        self.extra_eos_ids = self._generation_eos(folder)
        self._hidden = _hidden_ids(self._tokenizer)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @staticmethod
    def _generation_eos(folder: Path) -> set[int]:
        path = folder / "generation_config.json"
        if not path.exists():
            return set()
        value = json.loads(path.read_text()).get("eos_token_id")
        return set(value if isinstance(value, list) else [value] if value is not None else [])

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of generated ids, markup tokens left out (`_hidden_ids`)."""
        return self._tokenizer.decode([i for i in ids if i not in self._hidden], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
        template = environment.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
