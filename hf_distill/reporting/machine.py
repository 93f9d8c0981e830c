"""Which x86 CPU runs the deployed INT8 model, and which ONNX Runtime integer kernel that implies.

`describe_cpu()` reads /proc/cpuinfo (Linux; no dependency): the model name, the SIMD flags that decide ONNX Runtime's
uint8 x int8 matrix-multiply kernel, and the kernel MLAS picks from them (onnxruntime/core/mlas/lib/platform.cpp, in
its order: AVX2, then AVX-VNNI, then AVX-512 core, then AVX-512 VNNI, then AMX):

    flags                          kernel                          uint8 x int8 products
    avx2                           AVX2 VPMADDUBSW (ymm)           pairs summed into saturating int16
    + avx_vnni                     AVX-VNNI VPDPBUSD (ymm)         int32, exact
    avx512f/bw/dq/vl (no vnni)     AVX-512 core VPMADDUBSW (zmm)   pairs summed into saturating int16
    + avx512_vnni                  AVX-512 VNNI VPDPBUSDS (zmm)    int32, exact
    amx_tile + amx_int8            AMX TDPBUSD                     int32, exact
    no avx2                        SSE, widened to int16 (PMADDWD) int32, exact

`quantize_int8`'s scheme (int8 weights in [-64, 64]) is exact on all of them; a full-range int8 weight would not be on
the saturating ones. These are the kernels ONNX Runtime selects for this CPU; it does not report which one ran
(`compression.deployed.probe_u8s8_kernel` observes the family). The flags are asked of the CPU itself (CPUID, as MLAS
asks: `cpuid.cpuid_flags`), so that under an emulator (qemu-user) or a CPUID filter (benchmarks/_cpu_view.py) they are
the CPU the libraries see; /proc/cpuinfo (the kernel's view) is the fallback, and any disagreement is recorded.

The float32 matrix products (attention scores, an fp32 model's Linears) and every other float operator run on the
widest vector unit: zmm with AVX-512F, else ymm with AVX2 + FMA3 (`fp32_kernel`).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["INT8_FLAGS", "describe_cpu", "fp32_kernel", "int8_kernel", "read_cpuinfo"]

INT8_FLAGS = (
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
_CPUINFO = Path("/proc/cpuinfo")
_X86 = ("x86_64", "amd64", "i386", "i686")


def read_cpuinfo(path: str | Path = _CPUINFO) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo file; ("unknown", set()) if unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown", set()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif not line.strip() and (flags or model != "unknown"):
            break  # the end of the first processor's block
    return model, flags


def int8_kernel(flags: set[str]) -> dict[str, Any]:
    """The uint8 x int8 GEMM kernel ONNX Runtime's MLAS selects for these /proc/cpuinfo flags, and whether it
    saturates (sums pairs of products into int16)."""
    kernel, saturates = "SSE (widened to int16, PMADDWD)", False
    if "avx2" in flags:
        kernel, saturates = "AVX2 VPMADDUBSW", True
        if "avx_vnni" in flags:
            kernel, saturates = "AVX-VNNI VPDPBUSD", False
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            kernel, saturates = "AVX-512 core VPMADDUBSW", True
            if "avx512_vnni" in flags:
                kernel, saturates = "AVX-512 VNNI VPDPBUSDS", False
        if {"amx_tile", "amx_int8"} <= flags:
            kernel, saturates = "AMX TDPBUSD", False
    return {"u8s8_kernel": kernel, "u8s8_saturates_int16": saturates}


def fp32_kernel(flags: set[str]) -> str:
    """The vector width of ONNX Runtime's float32 GEMM (MLAS SGEMM) and element-wise kernels for these flags."""
    if "avx512f" in flags:
        return "AVX-512F (zmm, 16 floats)"
    if {"avx2", "fma"} <= flags:
        return "AVX2 + FMA3 (ymm, 8 floats)"
    if "avx" in flags:
        return "AVX (ymm, no FMA)"
    return "SSE (xmm, 4 floats)"


def describe_cpu(path: str | Path | None = None) -> dict[str, Any]:
    """The CPU as the INT8 deployment sees it: {"model", "machine", "flags": {flag: bool for INT8_FLAGS},
    "flags_source" ("cpuid" or the cpuinfo path), "u8s8_kernel", "u8s8_saturates_int16", "fp32_kernel"}, plus
    "cpuinfo_disagrees" ({flag: /proc/cpuinfo's value}) where CPUID and /proc/cpuinfo differ. With `path`, the flags
    are read from that cpuinfo file only (for tests and for describing another machine). For stage folders, reports
    and benchmarks."""
    model, cpuinfo_flags = read_cpuinfo(_CPUINFO if path is None else path)
    flags, source = cpuinfo_flags, str(_CPUINFO if path is None else path)
    if path is None:
        from hf_distill.reporting.cpuid import cpuid_flags

        seen = cpuid_flags()
        if seen is not None:
            flags, source = set(seen), "cpuid"
    machine = platform.machine()
    kernel = int8_kernel(flags)
    if machine.lower() not in _X86:
        kernel = {"u8s8_kernel": f"not x86 ({machine}): see MLAS", "u8s8_saturates_int16": None}
    description = {
        "model": model,
        "machine": machine,
        "flags": {flag: flag in flags for flag in INT8_FLAGS},
        "flags_source": source,
        **kernel,
        "fp32_kernel": fp32_kernel(flags),
    }
    disagree = {
        flag: flag in cpuinfo_flags for flag in INT8_FLAGS if (flag in flags) != (flag in cpuinfo_flags)
    }
    if source == "cpuid" and disagree and cpuinfo_flags:
        # An emulator or a CPUID filter: CPUID is what the libraries use.
        description["cpuinfo_disagrees"] = disagree
    return description
