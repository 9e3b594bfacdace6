"""Resilience: heartbeats, goodput, preemption and requeue, non-finite handling, fault injection for tests."""
