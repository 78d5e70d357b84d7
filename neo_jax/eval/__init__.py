"""Evaluation: ranking metrics over generated item lists."""
