"""The model: CMAL's encoders, associative prompt layer, unified encoder and heads, in pure
torch (``cmal.py`` reads top to bottom), its FLOP summary, and building it from a config
with pretrained text weights from a local folder (``pretrained.py``).

It owns the batch it reads (``Batch``, ``Anchors``) and imports only ``config``: no data,
engine, launch or CLI code, no I/O beyond loading weights, nothing distributed.
"""
