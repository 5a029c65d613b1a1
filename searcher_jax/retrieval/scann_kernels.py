"""Turn on the AVX2 kernels that ScaNN's PyPI wheel ships but never selects.

scann 1.4.x from PyPI probes the CPU with a function compiled to `return false`
(research_scann::port::TestCPUFeature), so on every x86 machine it runs its SSE4/AVX1
fallbacks: the asymmetric-hashing scan (LUT16Sse4, half of a tree + AH search), the
centroid and reordering dot products. The AVX2 versions are in the same binary, and ScaNN
reads its choice from an exported flag (research_scann::flags_internal::should_use_avx2)
on every search. Setting that flag where the CPU has AVX2 and FMA gives the same results
(rows identical, scores within 1.2e-7 on the retrieval benchmark) about 1.3x faster
(README, Benchmarks). AVX-512 is left off: ScaNN calls it experimental, and on the AMD
EPYC it was measured on it was no faster than AVX2.

SEARCHER_SCANN_AVX2=0 keeps the wheel's own choice.
"""
import contextlib
import ctypes
import functools
import os
import pathlib
import sys

AVX2_FLAG = "_ZN14research_scann14flags_internal15should_use_avx2E"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags every processor in /proc/cpuinfo's text lists (empty if none)."""
    per_cpu = [set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
               if line.startswith("flags") and ":" in line]
    return set.intersection(*per_cpu) if per_cpu else set()


@functools.cache
def cpu_has_avx2() -> bool:
    """Linux lists avx2 only where the OS also saves the YMM registers."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: leave ScaNN as it is
        return False
    return {"avx2", "fma"} <= cpu_flags(text)


@functools.cache
def _avx2_switch() -> ctypes.c_bool | None:
    """ScaNN's flag, or None where this build has no such symbol (another version or platform)."""
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401  (loads scann_pybind)
    module = sys.modules.get("scann_pybind")
    if module is None or not getattr(module, "__file__", None):
        return None
    try:
        return ctypes.c_bool.in_dll(ctypes.CDLL(module.__file__), AVX2_FLAG)
    except (OSError, ValueError):
        return None


def avx2_enabled() -> bool:
    switch = _avx2_switch()
    return bool(switch and switch.value)


def set_avx2(enabled: bool) -> bool:
    """Sets ScaNN's AVX2 switch (never on a CPU without AVX2); returns whether it is now on."""
    switch = _avx2_switch()
    if switch is not None:
        switch.value = bool(enabled) and cpu_has_avx2()
    return avx2_enabled()


@functools.cache
def enable_default() -> bool:
    """Once per process: AVX2 on where the CPU has it, unless SEARCHER_SCANN_AVX2=0."""
    return set_avx2(os.environ.get("SEARCHER_SCANN_AVX2", "1") != "0")


@contextlib.contextmanager
def avx2(enabled: bool):
    """Runs a block with the switch set, then restores it (benchmarks time both choices)."""
    before = avx2_enabled()
    set_avx2(enabled)
    try:
        yield
    finally:
        set_avx2(before)
