"""The schema registry: Confluent's REST API and compatibility rules, stored in the engine."""

from .registry import SchemaRegistry

__all__ = ["SchemaRegistry"]
