"""The tests' way to start real services: the starter shared with the benchmarks and `swarm up`."""

from swarm_client.stack import BIN, LISTENING, OUTPUT_WATCHERS, Process, Stack, StackError, stack, start

__all__ = ["BIN", "LISTENING", "OUTPUT_WATCHERS", "Process", "Stack", "StackError", "stack", "start"]
