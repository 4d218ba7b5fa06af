"""Data: the scene world, the anchor operator (text words × detector tags, ``anchors.py``)
and its vocabularies, region features, converters from the public formats into MDS shards,
and streaming those shards into the model's ``Batch``.

Imports ``config`` and, for the batch types it fills, ``model``; nothing that trains.
"""
