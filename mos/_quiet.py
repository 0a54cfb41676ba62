"""Third-party messages that every first run printed and that say nothing about the user's setup.

bitsandbytes (imported by peft and transformers whenever it is installed) logs "Failed to load
CPU gemm_4bit_forward from kernels-community" at import on CPUs with AVX512-BF16 when the optional
`kernels` package is absent, then uses its own CPU kernel. mos drops that one record (a filter
on that one logger; nothing else of bitsandbytes' logging changes). MOS_VERBOSE_IMPORTS=1 keeps it.
"""
import logging
import os

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _not_the_optional_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def install() -> None:
    if os.environ.get("MOS_VERBOSE_IMPORTS") != "1":
        logger = logging.getLogger(_BNB_CPU_LOGGER)
        if _not_the_optional_kernels_notice not in logger.filters:
            logger.addFilter(_not_the_optional_kernels_notice)
