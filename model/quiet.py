"""Third-party warnings a hotpeft user should not see, each replaced by one line that says what it means.

bitsandbytes, on CPUs with AVX-512 BF16, tries at import to fetch an optional fused nf4 kernel from
the Hugging Face Hub through the `kernels` package and warns "Failed to load CPU gemm_4bit_forward
... pip install kernels" when it cannot. hotpeft never downloads code at run time: nf4 then runs on
bitsandbytes' built-in CPU path, and the default CPU precision (`--quantize none`) does not use it.
"""
from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
EXPLANATION = ("bitsandbytes' optional fused nf4 kernel for this CPU (fetched from the Hugging Face Hub by the "
               "`kernels` package) is not used: nf4 runs on bitsandbytes' built-in CPU path, a little slower to "
               "decode; nothing to install (the CPU default, --quantize none, does not use nf4)")


class _HubKernelNotice(logging.Filter):
    """Drops bitsandbytes' `pip install kernels` warning and says once, at INFO, what it means."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" not in record.getMessage():
            return True
        if not _HubKernelNotice.said:
            _HubKernelNotice.said = True
            logging.getLogger("hotpeft.model").info(EXPLANATION)
        return False


def install() -> None:
    """Idempotent; before bitsandbytes is first imported (hotpeft.model's __init__ calls it)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _HubKernelNotice) for f in logger.filters):
        logger.addFilter(_HubKernelNotice())
