"""The event bus: run contexts, per-run sequence numbers, subscribers and fan-out."""
