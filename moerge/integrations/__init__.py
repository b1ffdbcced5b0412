"""Bridges to other tools, each an optional extra: :mod:`.lm_harness` (lm-evaluation-harness)."""
