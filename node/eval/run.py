"""Run the eval: one real node serving every skill, each question asked over A2A in a new context."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from node.a2a.playbooks import playbook, playbooks_dir
from node.config import ALL_SKILLS, available_cores
from node.demo.nodes import DemoNode, free_port, start_all, stop_all
from node.errors import PeerFailure
from node.eval.scoring import Verdict, judge
from node.network.peers import PeerClient

QUESTIONS_FILE = playbooks_dir().parent / "eval_questions.json"
CONCURRENCY = 3  # questions in flight: their decode steps batch on the node
TIMEOUT_S = 900


@dataclass(frozen=True)
class Question:
    skill: str
    text: str
    subject: list[str]
    terms: list[str]


def load_questions(path: Path, skills: tuple[str, ...], per_skill: int | None) -> list[Question]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        Question(skill, item["question"], list(item["subject"]), list(item["terms"]))
        for skill in skills
        for item in data[skill][:per_skill]
    ]


def instruction_texts(skill: str) -> list[str]:
    """Everything the node may have put before the question (either prompt format)."""
    from skills import SKILLS

    return [SKILLS[skill].system_prompt, playbook(skill)]


async def ask_all(url: str, questions: list[Question], max_tokens: int, say) -> list[dict]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        client = PeerClient(http, TIMEOUT_S)

        async def one(q: Question) -> dict:
            async with limit:
                started = time.monotonic()
                try:
                    answer = await client.ask(
                        url, q.skill, q.text, str(uuid.uuid4()), {"max_tokens": max_tokens}
                    )
                    text, usage = answer.text, answer.usage
                except PeerFailure as e:
                    text, usage = "", {"error": str(e)}
                verdict = judge(text, [*instruction_texts(q.skill), q.text], q.subject, q.terms)
                say(_line(q, text, verdict))
                return {
                    "skill": q.skill,
                    "question": q.text,
                    "answer": text,
                    "usage": usage,
                    "wall_s": round(time.monotonic() - started, 2),
                    **verdict.as_dict(),
                }

        return list(await asyncio.gather(*(one(q) for q in questions)))


def _line(q: Question, text: str, verdict: Verdict) -> str:
    mark = "PASS" if verdict.passed else "FAIL"
    why = "" if verdict.passed else f"  [{_why(verdict)}]"
    answer = textwrap.shorten(text.replace("\n", " "), 160) or "(empty)"
    return f"{mark} {q.skill}: {q.text}\n     -> {answer}{why}"


def _why(verdict: Verdict) -> str:
    if not verdict.non_empty:
        return "empty"
    if verdict.echo:
        return f"repeats its prompt: '{verdict.echo}'"
    return "names neither its subject nor a key term"


def _share(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows) / max(len(rows), 1), 3)


def summary(results: list[dict]) -> dict:
    skills = dict.fromkeys(r["skill"] for r in results)
    return {
        "passed_share": _share(results, "passed"),
        "passed_on_terms_share": _share(results, "passed_on_terms"),
        "non_empty_share": _share(results, "non_empty"),
        "no_echo_share": _share([r | {"ok": r["echo"] is None} for r in results], "ok"),
        "by_skill": {s: _share([r for r in results if r["skill"] == s], "passed") for s in skills},
        "questions": len(results),
    }


def run_eval(model: str, skills: tuple[str, ...], per_skill: int | None, max_tokens: int,
             json_path: Path | None, say, url: str | None = None) -> dict:  # fmt: skip
    """Ask every question at `url`, or at a node started here on `model` (stopped at the end)."""
    for noisy in ("httpx", "a2a"):  # one line per request would bury the answers
        logging.getLogger(noisy).setLevel(logging.WARNING)
    questions = load_questions(QUESTIONS_FILE, skills, per_skill)
    started = time.monotonic()
    if url is not None:
        results = asyncio.run(ask_all(url.rstrip("/"), questions, max_tokens, say))
    else:
        results = _on_own_node(model, questions, max_tokens, say)
    document = {"model": model if url is None else url, "max_tokens": max_tokens}
    document |= {"wall_s": round(time.monotonic() - started, 1)} | summary(results) | {"results": results}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=1))
    return document


def _on_own_node(model: str, questions: list[Question], max_tokens: int, say) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="node-eval-"))
    node = DemoNode(
        "eval", free_port(), root / "caches", root, "--skills", ",".join(ALL_SKILLS), "--model", model,
        "--max-tokens", str(max_tokens), "--threads", str(available_cores()),
    )  # fmt: skip
    say(f"starting a node on {model} (log {node.log_path})")
    try:
        start_all([node])
        return asyncio.run(ask_all(node.url, questions, max_tokens, say))
    finally:
        stop_all([node])
