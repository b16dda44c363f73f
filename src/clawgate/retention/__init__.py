"""Retention of everything on disk: what is deleted, when, and by which rule (docs/disk.md)."""
