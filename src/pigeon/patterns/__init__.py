"""Reliability patterns built on the Transport contract: idempotency stores, the outbox, dead-letter redrive."""
