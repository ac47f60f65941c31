"""Shared pieces of the RLGF scripts: tasks and data, embedded models, rewards and metrics, guides and
generation helpers. The algorithm logic lives in the top-level scripts."""
