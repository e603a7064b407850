"""The evaluator service: scores models on the held-out test set."""
