"""lora-sweep: LoRA / QLoRA hyperparameter sweeps. Ray Tune schedules, Optuna chooses, MLflow records."""

__version__ = "0.1.0"
