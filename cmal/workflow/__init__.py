"""The workflow: the stages a user runs and how they chain — pre-training
(``pretrain.py``), fine-tuning and evaluation (``finetune.py``, ``head_only.py``), a
workflow file's runner that skips done stages and resumes interrupted ones
(``runner.py``), and a study's expansion into stages (``study.py``).

Puts the layers below together: ``model``, ``data``, ``tasks``, ``engine``; knows no
cluster and no command line.
"""
