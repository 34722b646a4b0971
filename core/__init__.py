"""The vocabulary `sweep/` (the driver) and `trainable/` (the worker) share.

Pure Python: importing core starts no Ray, MLflow or torch (a test checks it), so config
validation, the estimator and the unit tests stay fast. Dependencies point one way:
sweep -> trainable -> core, and sweep -> core.

  schema    the space.yaml sections (pydantic) and their constants
  rules     the `auto` decisions (optimizer, target presets, gradient checkpointing)
  contract  what a trial reports: TrialStatus, metric names, result keys, outcome()
  request   what a trial is asked to do: TrialRequest (hyperparameters apart from placement and
            resume data), CohortRequest (several trials on one worker)
  estimate  peak-memory arithmetic for a trial, and the GPU share placement asks Ray for
"""
