"""Compute-node side of llm-training: config, data, model, parallel backends, training loop."""
