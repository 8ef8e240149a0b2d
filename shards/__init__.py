"""The shard contract as code (DESIGN.md, "The shard contract"): naming, writer, reader, manifest, verify."""
from shards.contract import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION"]
