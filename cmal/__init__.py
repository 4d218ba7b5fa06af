"""CMAL: Cross-Modal Associative Learning for vision-language pre-training.

The layers, each a package that imports only the ones before it (``tests/test_layers.py``
holds the rules; README's "Architecture" draws them): ``config`` and ``errors`` (what
everything is configured by and fails with) → ``model`` → ``data`` → ``tasks`` and
``engine`` → ``detect`` → ``workflow`` → ``launch`` → ``analysis`` → ``cli``.
"""
