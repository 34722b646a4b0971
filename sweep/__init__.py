"""lora-sweep: LoRA / QLoRA hyperparameter sweeps. Optuna chooses, Ray Tune places the workers that train the trials, MLflow records."""

__version__ = "0.1.0"
