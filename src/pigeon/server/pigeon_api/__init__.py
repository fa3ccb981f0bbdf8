"""``$PIGEON.API``: pigeon's own features over the NATS connection (docs/pigeon-api.md).

JetStream's API shows single-partition streams and shared groups only. This API serves the
whole engine: partitioned streams with keyed publishes, ordered and shared groups, dead
letters and lag per partition. pigeon's ``nats://`` transport uses it when it finds it.
"""

from ._api import PigeonApi

__all__ = ["PigeonApi"]
