"""Testing helpers, importable by users: the transport conformance suite and service probes."""
