"""Region-feature extraction with real object detectors (``cmal extract``)."""
