"""Login-node side of llm-training: the `llm-train` CLI, SLURM submission, run status."""
