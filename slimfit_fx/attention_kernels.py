"""Which fused attention kernel ``ops.attention_fused`` drives, read by the prediction and the runtime.

Takes the device type, the kernel eager SDPA picks for a shape (``op_table.sdpa_backend``) and
whether a mask is given; gives the kernel name the op runs, or None where it drives none.  Pure
arithmetic on names: never runs a kernel, never imports the runtime ops.
"""
from __future__ import annotations

__all__ = ["kernel_for"]


def kernel_for(device_type: str, backend: str, has_mask: bool) -> str | None:
    """The kernel ``ops.attention_fused`` runs for the backend eager SDPA picks, or None where it has
    none.  The memory-efficient kernel's backward takes its bias as a required tensor: used with a
    mask only."""
    if device_type == "cpu" and backend == "flash":
        return "flash_cpu"
    if device_type == "cuda" and (backend == "flash" or (backend == "efficient" and has_mask)):
        return backend
    return None
