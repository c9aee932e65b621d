"""Training the program's LM: GRPO presets and runs, the warm start, Arbor's config (06)."""
