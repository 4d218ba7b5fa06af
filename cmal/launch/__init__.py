"""The cluster launch (``cmal submit``, ``status``, ``cancel``): a stage or a workflow as a
SLURM job through submitit, or as local processes, requeued after preemption to resume.

Imports the stages it runs (``workflow``, ``detect``) and ``engine`` for its exit codes.
"""
