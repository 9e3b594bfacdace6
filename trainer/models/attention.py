"""Which attention implementation a run uses: flash-attn where it can run, else SDPA, else eager."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from trainer.errors import UserError

log = logging.getLogger(__name__)


@functools.cache
def flash_attn_importable() -> bool:
    """flash-attn installed and loadable: a build for another torch or CUDA fails to import."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # ImportError or OSError (undefined symbol, missing library)
        log.warning("flash-attn is installed but does not import (%s); it is not used", error)
        return False
    return True


FLASH_PRECISIONS = ("bf16", "fp16")
"""flash-attn's kernels take only half-precision inputs: an fp32 run uses SDPA (or eager)."""


def choose_attention(requested: str, device: torch.device, precision: str) -> str:
    """flash-attn on CUDA >= 8.0 in bf16/fp16 when importable, else SDPA, else eager. The choice is logged.

    `precision` is the run's `train.precision`: `auto` never picks flash-attn for fp32, and asking for
    `flash_attention_2` with fp32 is a UserError naming both keys.
    """
    if requested == "flash_attention_2" and precision not in FLASH_PRECISIONS:
        raise UserError(
            f"model.attn=flash_attention_2 runs only in bf16 or fp16, not train.precision={precision}; "
            "set train.precision=bf16 or model.attn=auto (SDPA in fp32)"
        )
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    flash_ok = capability is not None and capability >= (8, 0) and flash_attn_importable()
    if requested == "auto":
        if flash_ok and precision in FLASH_PRECISIONS:
            choice = "flash_attention_2"
        elif hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            choice = "sdpa"
        else:
            choice = "eager"
    elif requested == "flash_attention_2" and not flash_ok:
        raise UserError(
            "model.attn=flash_attention_2 needs the flash-attn package and a CUDA GPU of compute capability >= 8.0 "
            f"(device {device}, capability {capability}, flash-attn importable: {flash_attn_importable()}); "
            "use model.attn=auto or install the [flash] extra"
        )
    else:
        choice = requested
    log.info(
        "attention implementation: %s (requested %s, device %s, %s)", choice, requested, device, precision
    )
    return choice
