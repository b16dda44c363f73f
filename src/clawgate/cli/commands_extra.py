"""Registers the `batch` and `bench` commands (kept out of main.py so each stays small)."""

from __future__ import annotations
