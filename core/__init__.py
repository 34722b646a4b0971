"""The vocabulary `sweep/` (the driver) and `trainable/` (the worker) share.

Pure Python: importing core starts no Ray, MLflow or torch (a test checks it), so config
validation, the estimator and the unit tests stay fast. Dependencies point one way:
sweep -> trainable -> core, and sweep -> core.

  schema    the space.yaml sections (pydantic) and their constants
  rules     the `auto` decisions (optimizer, target presets, gradient checkpointing, the fast
            step's loss / LoRA dtype / compile, cohort folding and passes)
  contract  what a trial reports: TrialStatus, metric names, result keys; the trial label, the
            sweep folder's trial files, study attribute and MLflow tag names
  request   what a worker is asked to train: TrialRequest (one Optuna trial, where it continues from)
  estimate  peak-memory arithmetic for a cohort (a lone trial is a cohort of one), and placement
"""
