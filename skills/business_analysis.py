"""Business analysis: markets, costs, risks and business cases."""

from __future__ import annotations

from node.a2a.executor import SkillExecutor


class BusinessAnalysisExecutor(SkillExecutor):
    skill_id = "business_analysis"
    system_prompt = (
        "You are a business analyst. Answer briefly and concretely: state the goal, the costs and "
        "benefits, the main risks and what to measure. Give numbers with their assumptions and say "
        "so when information is missing instead of guessing."
    )
