"""What the uber-agent and the workers say to the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from swarm_common.providers.base import OutlineRequest, PlanRequest

PLAN_SYSTEM = (
    "You are the planner of a swarm of parallel agents. Split the user's idea into exactly the "
    "requested number of independent subtasks. Each subtask must be doable on its own, without "
    "the others' results, by an agent that sees only the idea and that subtask. Together they must "
    "cover the idea without overlapping. Answer with JSON only."
)

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "subtasks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "instructions": {"type": "string"},
                },
                "required": ["title", "instructions"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["subtasks"],
    "additionalProperties": False,
}


OUTLINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "areas": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "scope": {"type": "string"},
                },
                "required": ["title", "scope"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["areas"],
    "additionalProperties": False,
}


def _answer_again(feedback: str) -> str:
    return f"\n\nYour previous answer was rejected: {feedback}. Answer again, correctly." if feedback else ""


def plan_prompt(request: PlanRequest) -> str:
    count, area = request.num_agents, request.area
    prompt = f"Idea:\n{request.idea}\n\n"
    if area is None:
        prompt += f"Split it into exactly {count} independent subtasks. "
    else:
        areas = "\n".join(f"{index}. {title}" for index, title in enumerate(area.titles, start=1))
        prompt += (
            f"The work on it is divided into {len(area.titles)} areas, each planned on its own:\n{areas}\n\n"
            f"Your area is area {area.index}, {area.title}: {area.scope}\n"
            f"Split your area alone into exactly {count} independent subtasks. "
        )
    prompt += (
        f"Keep each subtask's instructions concise: at most {request.instruction_words} words. "
        'Answer as {"subtasks": [{"title": "...", "instructions": "..."}, ...]} '
        f"with exactly {count} items."
    )
    return prompt + _answer_again(request.feedback)


OUTLINE_SYSTEM = (
    "You are the planner of a swarm of parallel agents. The swarm is too big to plan in one answer, "
    "so its plan is made in parts: first you divide the user's idea into areas, then each area is "
    "split into subtasks on its own. The areas must be about equal in size and together cover the "
    "idea without overlapping. Answer with JSON only."
)


def outline_prompt(request: OutlineRequest) -> str:
    count = request.areas
    prompt = (
        f"Idea:\n{request.idea}\n\n"
        f"Divide it into exactly {count} areas. Give each area a short title and a scope of at most "
        'forty words that says what belongs to it. Answer as {"areas": [{"title": "...", "scope": "..."}, '
        f"...]}} with exactly {count} items."
    )
    return prompt + _answer_again(request.feedback)


# Workers and syntheses share one system prompt, and their user messages begin alike (the idea,
# then the plan's subtask titles): the prompt cache keys on a prompt's prefix, so all of a swarm's
# calls on one model can share theirs. What each call is asked to do comes last.
SWARM_SYSTEM = (
    "You are an agent of a swarm working on one idea: a planner split it into independent "
    "subtasks, one agent does each of them in parallel, and a lead combines their results. The "
    "message gives the idea first, then what is asked of you. Answer in Markdown."
)


def idea_block(idea: str) -> str:
    return f"The idea:\n{idea}\n\n"


def plan_context(titles: Sequence[str]) -> str:
    """What the plan says about the whole: every subtask's title, in plan order."""
    listed = "\n".join(f"{index}. {title}" for index, title in enumerate(titles, start=1))
    return f"The plan: {len(titles)} subtasks, each done by its own agent at the same time:\n{listed}\n\n"


def worker_prompt(title: str, instructions: str) -> str:
    """A subtask's own part of its prompt, after the idea and the plan."""
    return (
        f"Subtask: {title}\n\nYour instructions:\n{instructions}\n\n"
        "Do your subtask thoroughly and concretely; do not attempt the other parts."
    )


def _sections(results: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"### {title}\n{output}" for title, output in results)


def synthesis_prompt(results: list[tuple[str, str]]) -> str:
    """The synthesis's own part of its prompt, after the idea. results: (subtask title, output) in
    plan order."""
    return (
        f"Synthesis of {len(results)} results: you are the lead. Combine the agents' results into one "
        "coherent, well-organised answer to the idea. Resolve overlaps and contradictions; keep what "
        f"is concrete.\n\nThe agents' results:\n\n{_sections(results)}"
    )


def partial_synthesis_prompt(results: list[tuple[str, str]], covers: str) -> str:
    """A partial synthesis's own part of its prompt, after the idea. results: (title, output) in
    plan order; `covers` says which of the swarm's results they are."""
    return (
        f"Partial synthesis of {covers}: combine this group of the agents' results. A later step "
        "combines the partial syntheses of all groups into the final answer, so keep every concrete "
        "finding, figure and recommendation, merge what overlaps, and leave out introductions and "
        f"conclusions.\n\nThe agents' results:\n\n{_sections(results)}"
    )
