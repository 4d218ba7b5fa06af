"""Data: the scene world, converters from public formats, MDS shards, streaming."""
