"""The `auto` decisions, made the same way by the estimator (in the driver, before a trial is
launched) and by the trainable (on the worker), because both ask here.

The defaults follow the Gemma 3 fine-tuning recipe this project started from: LoRA on the seven
projections, paged 8-bit AdamW under QLoRA.
"""

from __future__ import annotations

TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}  # the recipe's seven projections = all-linear
TARGET_PRESETS = tuple(TARGET_MODULES)
CHECKPOINTING_SHARE = 0.25  # auto checkpointing: activations above this share of the device


def target_names(target_modules: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A preset (attention, mlp, all-linear) -> its module names; an explicit list as a tuple."""
    return TARGET_MODULES[target_modules] if isinstance(target_modules, str) else tuple(target_modules)


def optimizer(requested: str, method: str) -> str:
    """auto: paged 8-bit AdamW for QLoRA (the recipe's choice: small optimizer state), plain
    AdamW for LoRA."""
    if requested != "auto":
        return requested
    return "paged_adamw_8bit" if method == "qlora" else "adamw"


def gradient_checkpointing(requested: bool | str, activation_bytes: float, device_bytes: float | None) -> bool:
    """on / off as configured; auto: on when the decoder's saved activations (`activation_bytes`,
    see core.estimate.layer_activation_bytes) would take more than a quarter of the device. Never
    without a device size (a CPU, where memory is not the constraint)."""
    if requested != "auto":
        return bool(requested)
    return device_bytes is not None and activation_bytes > CHECKPOINTING_SHARE * device_bytes
