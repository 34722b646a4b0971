"""The worker's process and device: memory peaks, the GPU share cap, where Ray placed it, OOM."""

from __future__ import annotations

import resource
from typing import Any

from core.estimate import CONTEXT_BYTES


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak is this worker's, not the process's before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: Any) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {
            "peak_vram_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_vram_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"peak_rss_gb": int(line.split()[1]) / 2**20}
    except OSError:
        pass
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def cap_memory(share: float | None, gpu_bytes: int | None = None) -> float | None:
    """On a shared GPU, keep this worker inside the share Ray gave it: past that, PyTorch raises
    OOM here instead of taking memory from the workers beside it. The share is of
    `gpu_bytes` (the GPU size placement planned with: resources.gpu_memory_gb, which may be set
    below the device's memory), else of the whole device. Returns the fraction of the device used."""
    import torch

    if not share or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    allowed = share * min(gpu_bytes or total, total)
    if allowed >= total:
        return None
    fraction = max(0.01, (allowed - CONTEXT_BYTES) / total)  # the share also covers the CUDA context
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def ray_node() -> str:
    """The Ray node this worker runs on (a cluster sweep spreads workers over nodes), or 'local'."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # no Ray here (tests, benchmarks)
        return "local"


def gpu_ids() -> str:
    """The GPU(s) Ray gave this worker (a fractional share names the GPU it shares), or 'none'."""
    try:
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # no Ray here (tests, benchmarks)
        ids = []
    return ",".join(str(i) for i in ids) or "none"


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
