"""Region-feature extraction with real object detectors (``cmal extract``): CenterNet from
TF.js weights, Faster R-CNN from a weights file, resumable over a folder or an object store.

Imports ``config``, ``data`` (the feature files it writes) and ``engine`` (the store).
"""
