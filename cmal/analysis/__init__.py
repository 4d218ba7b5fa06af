"""Analysis of finished runs: a study's tables, verdicts and plot (``report.py``), and the
figures of pre-trained models (``visualize.py``: t-SNE, attention, AMC confusion).

Reads run folders; imports ``model``, ``data`` and ``workflow`` (to load weights), never
trains.
"""
