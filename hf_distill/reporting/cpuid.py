"""The SIMD extensions this process sees, asked of the CPU itself (the CPUID and XGETBV instructions), as ONNX
Runtime's MLAS asks when it picks its kernels.

/proc/cpuinfo is the kernel's view, which is the same on ordinary machines but not under an emulator (qemu-user
answers CPUID for the CPU it emulates) or a preloaded CPUID filter (benchmarks/_cpu_view.py): there the libraries
pick their kernels from what CPUID answers, and so does this module. Standard library only: the two instructions
run from a page of machine code mapped executable with `mmap` and called with `ctypes`. On other architectures, or
where executable mappings are refused (some hardened kernels), `cpuid_flags()` returns None and callers fall back
to /proc/cpuinfo.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from functools import lru_cache

__all__ = ["cpuid_flags"]

# uint32 cpuid(uint32 leaf = edi, uint32 subleaf = esi, uint32 out[4] = rdx): eax, ebx, ecx, edx into out.
_CPUID_CODE = bytes.fromhex(
    "53"  # push rbx (callee-saved; CPUID writes it)
    "4989d0"  # mov r8, rdx
    "89f8"  # mov eax, edi
    "89f1"  # mov ecx, esi
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8 + 4], ebx
    "41894808"  # mov [r8 + 8], ecx
    "4189500c"  # mov [r8 + 12], edx
    "5b"  # pop rbx
    "c3"  # ret
)
# uint64 xgetbv(uint32 register = edi): edx:eax.
_XGETBV_CODE = bytes.fromhex(
    "89f9"  # mov ecx, edi
    "0f01d0"  # xgetbv
    "48c1e220"  # shl rdx, 32
    "4809d0"  # or rax, rdx
    "c3"  # ret
)

# (leaf, subleaf, register index in eax/ebx/ecx/edx, bit) of each /proc/cpuinfo flag name this project records.
_LEAF7 = {
    "avx2": (7, 0, 1, 5),
    "avx512f": (7, 0, 1, 16),
    "avx512dq": (7, 0, 1, 17),
    "avx512bw": (7, 0, 1, 30),
    "avx512vl": (7, 0, 1, 31),
    "avx512_vnni": (7, 0, 2, 11),
    "amx_bf16": (7, 0, 3, 22),
    "amx_tile": (7, 0, 3, 24),
    "amx_int8": (7, 0, 3, 25),
    "avx_vnni": (7, 1, 0, 4),
}
_XCR0_AVX = 0b110  # SSE and AVX (ymm) state enabled by the OS
_XCR0_AVX512 = 0b11100110  # plus opmask and zmm state
_XCR0_AMX = 0b11 << 17  # tile configuration and tile data


class _Instructions:
    def __init__(self):
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CPUID_CODE + _XGETBV_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.cpuid_function = ctypes.CFUNCTYPE(
            None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)
        )(address)
        self.xgetbv_function = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(address + len(_CPUID_CODE))

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        registers = (ctypes.c_uint32 * 4)()
        self.cpuid_function(leaf, subleaf, registers)
        return tuple(registers)


@lru_cache(maxsize=1)
def cpuid_flags() -> frozenset[str] | None:
    """The /proc/cpuinfo names ("fma", "avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", ...) of the
    extensions CPUID reports *and* the OS has enabled (XCR0), as this process sees them; None where CPUID cannot be
    asked (not x86-64, or no executable mapping)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        instructions = _Instructions()
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    max_leaf = instructions.cpuid(0)[0]
    leaf1 = instructions.cpuid(1)
    osxsave, avx, fma = bool(leaf1[2] >> 27 & 1), bool(leaf1[2] >> 28 & 1), bool(leaf1[2] >> 12 & 1)
    xcr0 = instructions.xgetbv_function(0) if osxsave else 0
    flags = set()
    if (xcr0 & _XCR0_AVX) == _XCR0_AVX:
        flags |= {name for name, present in (("avx", avx), ("fma", fma)) if present}
    leaves = {}
    for name, (leaf, subleaf, register, bit) in _LEAF7.items():
        if leaf > max_leaf:
            continue
        if (leaf, subleaf) not in leaves:
            leaves[leaf, subleaf] = instructions.cpuid(leaf, subleaf)
        if leaves[leaf, subleaf][register] >> bit & 1:
            flags.add(name)
    if (xcr0 & _XCR0_AVX) != _XCR0_AVX:
        flags -= {"avx2", "avx_vnni"}
    if (xcr0 & _XCR0_AVX512) != _XCR0_AVX512:
        flags -= {name for name in flags if name.startswith("avx512")}
    if (xcr0 & _XCR0_AMX) != _XCR0_AMX:
        flags -= {name for name in flags if name.startswith("amx")}
    return frozenset(flags)
