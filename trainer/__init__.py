"""hotpeft.trainer: JSONL to an evaluated, registered adapter (see the trainer issue)."""
