"""Data: the scene world, the anchor operator (text words × detector tags, ``anchors.py``)
and its vocabularies, region features (``features.py``, ``vinvl.py``), converters from the
public formats into shard sets (``convert/``: text samples + an image store holding each
image's features once, ``schema.py``), reading them (``source.py``, ``mds.py``,
``images.py``, ``stream.py``) and batching them into the model's ``Batch``
(``batches.py``).

Imports ``config`` and, for the batch types it fills, ``model``; nothing that trains.
"""

from cmal.data.lean_streaming import defer

defer()
