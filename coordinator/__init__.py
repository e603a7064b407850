"""The coordinator: runs federated rounds over the workers and reports to the evaluator."""
