"""The worker service: executes one subtask at a time per call with the model, keeping nothing."""
