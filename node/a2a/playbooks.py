"""Skill playbooks: the worked examples a base model reads before each conversation of a skill.

They are data (`skills/playbooks/<skill_id>.txt`, shipped in the wheel with the `skills`
package), written for a base model to continue: a short header, then
Question/Answer pairs in the skill's voice (`node.model.prompt_format.DocumentFormat`).
"""

from __future__ import annotations

import functools
from pathlib import Path


def playbooks_dir() -> Path:
    """`skills/playbooks/` of a source checkout or of an installed wheel (`skills` is a package)."""
    import skills

    return Path(skills.__file__).resolve().parent / "playbooks"


@functools.cache
def playbook(skill_id: str) -> str:
    path = playbooks_dir() / f"{skill_id}.txt"
    return path.read_text(encoding="utf-8").strip()
