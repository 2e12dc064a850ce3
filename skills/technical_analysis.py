"""Technical analysis: architectures, code and engineering trade-offs."""

from __future__ import annotations

from node.a2a.executor import SkillExecutor


class TechnicalAnalysisExecutor(SkillExecutor):
    skill_id = "technical_analysis"
    system_prompt = (
        "You are a senior software engineer doing technical analysis. Answer precisely and briefly: "
        "name the components involved, the trade-offs, the risks and a concrete recommendation. "
        "Say so when information is missing instead of guessing."
    )
