"""Deterministic text for the bench: long varied documents, session questions, agent roles.

Varied sentences (not one repeated line) so that prefill does realistic work and greedy decoding
does not collapse into a loop immediately.
"""

from __future__ import annotations

TEMPLATES = (
    (
        "Section {i}. The storage team migrated {a} services to the replicated log, cutting p99 write "
        "latency from {b} ms to {c} ms while traffic grew by {d} percent. "
    ),
    (
        "In region {i} the on-call rotation handled {a} incidents; {c} of them were caused by expired "
        "certificates and {b} by a misconfigured load balancer that dropped long-lived connections. "
    ),
    (
        "Finance noted that compute spend for project {i} rose to {a} thousand dollars, {d} percent "
        "above plan, mostly from idle GPU reservations that nobody released after the experiment. "
    ),
    (
        "Risk {i}: the legacy billing API still serves {a} requests per second from {b} clients, and "
        "its deprecation needs a migration guide, a compatibility shim and {c} weeks of notice. "
    ),
    (
        "Customer interview {i} said the dashboard takes {b} seconds to load and that exporting more "
        "than {a} rows fails silently, which erodes trust in every number the report shows. "
    ),
)

ROLES = {
    "technical": "You are the technical analyst. You assess architecture, latency, reliability and "
    "operational risk in engineering reports, cite the figures you rely on, and flag anything that "
    "could cause an outage. ",
    "business": "You are the business analyst. You assess cost, revenue impact, customer sentiment "
    "and deadlines in engineering reports, and you translate technical findings into money and "
    "time. ",
    "coordinator": "You are the coordinator. You read the technical and business analysts' notes, "
    "resolve their disagreements, and write a short plan with owners and dates. ",
}

QUESTIONS = (
    " Question: which service had the worst latency, and why? Answer:",
    " Question: what is the single biggest cost risk in this report? Answer:",
    " Question: which customer complaint should be fixed first? Answer:",
    " Question: what must happen before the billing API is retired? Answer:",
    " Question: summarize the state of the on-call rotation in one sentence. Answer:",
    " Question: which region needs attention next quarter? Answer:",
)


def document(sentences: int, offset: int = 0) -> str:
    parts = []
    for n in range(offset, offset + sentences):
        template = TEMPLATES[n % len(TEMPLATES)]
        parts.append(
            template.format(
                i=n + 1, a=17 + (n * 37) % 400, b=3 + (n * 11) % 90, c=1 + (n * 7) % 40, d=2 + (n * 13) % 60
            )
        )
    return "".join(parts)


def tokens(engine, count: int) -> list[int]:
    """Exactly `count` token ids: BOS and a document long enough to cut at `count`."""
    sentences = max(4, count // 30)
    while True:
        ids = engine.encode(document(sentences))
        if len(ids) >= count:
            return ids[:count]
        sentences *= 2


def role_prompt(engine, role: str, count: int) -> list[int]:
    """A system prompt for `role` padded with a role-specific briefing to `count` tokens."""
    offset = 1000 * (1 + list(ROLES).index(role))
    sentences = max(4, count // 30)
    while True:
        ids = engine.encode(ROLES[role] + "Briefing: " + document(sentences, offset))
        if len(ids) >= count:
            return ids[:count]
        sentences *= 2


def question(n: int) -> str:
    return QUESTIONS[n % len(QUESTIONS)]


def document_of(engine, count: int) -> str:
    """Whole sentences whose encoding (with BOS) is at least `count` tokens."""
    sentences = max(2, count // 40)
    while len(engine.encode(document(sentences))) < count:
        sentences += max(1, sentences // 8)
    return document(sentences)
