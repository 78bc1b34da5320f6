"""What the uber-agent and the workers say to the model."""

from __future__ import annotations

from typing import Any

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


def plan_prompt(idea: str, num_agents: int, feedback: str = "") -> str:
    prompt = (
        f"Idea:\n{idea}\n\n"
        f"Split it into exactly {num_agents} independent subtasks. "
        'Answer as {"subtasks": [{"title": "...", "instructions": "..."}, ...]} '
        f"with exactly {num_agents} items."
    )
    if feedback:
        prompt += f"\n\nYour previous answer was rejected: {feedback}. Answer again, correctly."
    return prompt


WORKER_SYSTEM = (
    "You are one agent of a swarm working in parallel on parts of a larger idea. Do your subtask "
    "thoroughly and concretely; do not attempt the other parts. Answer in Markdown."
)


def worker_prompt(idea: str, title: str, instructions: str) -> str:
    return f"Subtask: {title}\n\nThe larger idea, for context:\n{idea}\n\nYour instructions:\n{instructions}"


SYNTHESIS_SYSTEM = (
    "You are the lead of a swarm of parallel agents. Combine their results into one coherent, "
    "well-organised answer to the original idea. Resolve overlaps and contradictions; keep what "
    "is concrete. Answer in Markdown."
)


def synthesis_prompt(idea: str, results: list[tuple[str, str]]) -> str:
    """results: (subtask title, output) in plan order."""
    sections = "\n\n".join(f"### {title}\n{output}" for title, output in results)
    return f"Synthesis of {len(results)} results for the idea:\n{idea}\n\nThe agents' results:\n\n{sections}"
