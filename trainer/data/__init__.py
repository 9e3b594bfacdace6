"""Data: preparing MDS datasets (prepare/), reading them (loader, mixtures, shards) and shared-memory hygiene."""
