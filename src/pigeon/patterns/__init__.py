"""Reliability patterns built on the Transport contract.

Idempotency stores, the transactional outbox, dead-letter redrive.
"""
