"""The chaos soak: a real stack, continuous load, random faults, and every invariant checked."""
