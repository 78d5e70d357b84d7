"""Training: staged SID grounding and instruction tuning over a named device mesh."""
