"""Agent profiles: the configured agents and what each may use."""
