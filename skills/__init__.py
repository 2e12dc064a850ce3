"""The skills a node can host: skill id -> executor class (one module per skill)."""

from __future__ import annotations

from skills.business_analysis import BusinessAnalysisExecutor
from skills.coordination import CoordinationExecutor
from skills.technical_analysis import TechnicalAnalysisExecutor

DEFAULT_SKILL = "coordination"

SKILLS = {
    TechnicalAnalysisExecutor.skill_id: TechnicalAnalysisExecutor,
    BusinessAnalysisExecutor.skill_id: BusinessAnalysisExecutor,
    CoordinationExecutor.skill_id: CoordinationExecutor,
}

__all__ = [
    "DEFAULT_SKILL",
    "SKILLS",
    "BusinessAnalysisExecutor",
    "CoordinationExecutor",
    "TechnicalAnalysisExecutor",
]
