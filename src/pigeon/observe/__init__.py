"""Observing pigeon from outside: group health, alerts and metrics."""
