"""The orchestrator service: plans swarms, runs their subtasks on the worker pool, synthesizes results."""
