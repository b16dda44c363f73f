"""Automation on top of the run service: scheduled runs (cron) and usage accounting."""
