"""`swarm-web`: a browser console for the orchestrator, and a gRPC client of it like any other.

It serves one page and a small HTTP API (`swarm_web.app`); each swarm's events reach the browser
as Server-Sent Events carrying the swarm.v1 events in proto3 JSON.
"""
