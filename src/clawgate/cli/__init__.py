"""The `clawgate` command line."""
