"""Benchmarks of the Parallel Agent Scheduler (issue 5), run by `make bench` / `python -m bench`.

Each benchmark is a module with `run(ctx) -> dict` of figures (and TITLE, TARGETS, UNITS); every
one starts its own real services (the venv's `swarm-orchestrator` and `swarm-worker`, simulated
provider, 127.0.0.1 port 0) and stops them. The module docstrings define each figure precisely.

    dispatch     1a  subtasks/s through the whole path, and the raw grpc.aio floor (floor.py)
    in_process   1b  the same subtasks as one asyncio.gather in one process
    makespan     1c  makespan efficiency of the scheduler
    streaming    1d  lag of streamed chunks, event rate, CPU
    memory       1e  orchestrator RSS with 1,000 subtasks in flight
    many_swarms  1f  50 concurrent clients: completion and time to first event
    ray_peer     1g  the same fan-out as Ray tasks (optional `bench` extra)
    many_streams 1h  1,000 agents streaming at once: lag, text delivered, memory per subtask
    watchers     1i  the orchestrator's CPU with ten watchers of a swarm against one
    bench_store      the store's own benchmark (SQLite against in-memory), when present

common.py holds the process, client, /proc and statistics helpers; chunks.py the streaming
workloads and their lag; profiling.py the optional py-spy profiles (`--profile`). Every run first
measures the raw grpc.aio floor (floor.py) and prints it with the machine.
"""
