"""The answer checks of `python -m node eval`, as pure functions of text."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

ECHO_WORDS = 8


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def ngrams(text: str, n: int = ECHO_WORDS) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def echoed_run(answer: str, prompt_texts: list[str], n: int = ECHO_WORDS) -> str | None:
    """The first n-word run of `answer` that also occurs in the prompt, or None."""
    prompt = set().union(*(ngrams(text, n) for text in prompt_texts)) if prompt_texts else set()
    tokens = words(answer)
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n]) in prompt:
            return " ".join(tokens[i : i + n])
    return None


def named_terms(answer: str, terms: list[str]) -> list[str]:
    lowered = answer.lower()
    return [term for term in terms if term.lower() in lowered]


@dataclass(frozen=True)
class Verdict:
    non_empty: bool
    echo: str | None  # the repeated run, if any
    subject: list[str]  # the question's own subject words the answer names (on topic)
    terms: list[str]  # the domain terms the answer names

    @property
    def passed(self) -> bool:
        return self.non_empty and self.echo is None and bool(self.subject or self.terms)

    @property
    def passed_on_terms(self) -> bool:
        """The stricter reading: a domain term, not only the question's subject, is named."""
        return self.non_empty and self.echo is None and bool(self.terms)

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed, "passed_on_terms": self.passed_on_terms}


def judge(answer: str, prompt_texts: list[str], subject: list[str], terms: list[str]) -> Verdict:
    return Verdict(
        non_empty=bool(answer.strip()),
        echo=echoed_run(answer, prompt_texts),
        subject=named_terms(answer, subject),
        terms=named_terms(answer, terms),
    )
