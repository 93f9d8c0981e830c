"""Run a command as if this x86 CPU had fewer SIMD extensions, at native speed: an AVX2-only CPU (no AVX-512, no
VNNI, no AMX) or an AVX-512 CPU without VNNI (Skylake-SP), so that ONNX Runtime's MLAS, oneDNN, MKL and numpy pick
the kernels they pick there, and those kernels can be timed and checked on this machine.

How: a small shared library, preloaded (`LD_PRELOAD`), turns on Linux's CPUID faulting for the process
(`arch_prctl(ARCH_SET_CPUID, 0)`, inherited by its threads and children): every CPUID instruction then traps, and its
SIGSEGV handler executes the real CPUID and clears the bits of the hidden extensions (leaf 7: AVX-512 F/DQ/CD/BW/VL/
IFMA/VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ/FP16/BF16, AVX-VNNI, AMX) before the program sees them. Libraries that ask
CPUID after the preload (onnxruntime, torch, numpy: all imported by Python later) see the smaller CPU. Not hidden:
glibc's own string functions, which read CPUID before any preload runs, and /proc/cpuinfo (the kernel's view).

What it is and is not: the hidden kernels' instructions really run on this core, so their results (integer
saturation, float rounding) are those of an AVX2 CPU, and their timings are those of the AVX2 code paths *on this
microarchitecture* (an AMD Zen 4 here, whose 256-bit pipes resemble Zen 3's). It is not a measurement on an
AVX2-only CPU: clocks, caches and memory differ. Where a figure comes from this view, say so.

Needs: Linux on x86-64, a C compiler (`cc`), and CPUID faulting (Intel since Ivy Bridge, and any KVM guest, where
the hypervisor emulates it); `unavailable()` says which is missing.

    env = cpu_view_env("avx2")            # os.environ + LD_PRELOAD + HF_DISTILL_CPU_VIEW
    subprocess.run([sys.executable, "script.py"], env=env)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VIEWS = ("avx2", "avx512_no_vnni")
ENV_VARIABLE = "HF_DISTILL_CPU_VIEW"

_SOURCE = r"""
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* Bits cleared from CPUID leaf 7 (subleaf 0: ebx, ecx, edx; subleaf 1: eax, edx). */
static uint32_t hide_ebx, hide_ecx, hide_edx, hide_1_eax, hide_1_edx;
static struct sigaction previous;

static void cpuid_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_fault(int signal_number, siginfo_t *info, void *context) {
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *regs = uc->uc_mcontext.gregs;
    if (info->si_code == SI_KERNEL) {
        const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
        if (ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
            unsigned int leaf = (unsigned int)regs[REG_RAX], sub = (unsigned int)regs[REG_RCX];
            unsigned int a, b, c, d;
            cpuid_faulting(0);
            __cpuid_count(leaf, sub, a, b, c, d);
            cpuid_faulting(1);
            if (leaf == 7 && sub == 0) { b &= ~hide_ebx; c &= ~hide_ecx; d &= ~hide_edx; }
            if (leaf == 7 && sub == 1) { a &= ~hide_1_eax; d &= ~hide_1_edx; }
            regs[REG_RAX] = a; regs[REG_RBX] = b; regs[REG_RCX] = c; regs[REG_RDX] = d;
            regs[REG_RIP] += 2;
            return;
        }
    }
    /* Not a CPUID: the previous handler, or the default action (returning re-runs the faulting instruction). */
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
        previous.sa_sigaction(signal_number, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(signal_number);
    } else {
        signal(SIGSEGV, SIG_DFL);
    }
}

__attribute__((constructor)) static void start(void) {
    const char *view = getenv("HF_DISTILL_CPU_VIEW");
    if (view == NULL) return;
    /* AMX (edx 22, 24, 25), AVX-512 FP16 (edx 23), AVX-VNNI (1.eax 4), AVX-512 BF16 (1.eax 5), AVX-VNNI-INT8 (1.edx 4),
       AVX10 (1.edx 19): hidden in both views; AVX-512 VNNI (ecx 11) too. */
    hide_ecx = 1u << 11;
    hide_edx = (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25);
    hide_1_eax = (1u << 4) | (1u << 5);
    hide_1_edx = (1u << 4) | (1u << 19);
    if (strcmp(view, "avx2") == 0) {
        /* AVX-512 F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        hide_ebx = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                   (1u << 31);
        /* VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        hide_ecx |= (1u << 1) | (1u << 6) | (1u << 12) | (1u << 14);
        /* 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8 */
        hide_edx |= (1u << 2) | (1u << 3) | (1u << 8);
    } else if (strcmp(view, "avx512_no_vnni") != 0) {
        return;
    }
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &previous) != 0) return;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) sigaction(SIGSEGV, &previous, NULL);
}
"""


def _cpuid_faulting_supported() -> bool:
    """Whether this kernel and CPU support CPUID faulting (ARCH_GET_CPUID answers; nothing is changed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    arch_prctl, get_cpuid = 158, 0x1011  # x86-64 syscall number, ARCH_GET_CPUID
    if libc.syscall(arch_prctl, get_cpuid, 0) < 0:
        return False
    # ARCH_GET_CPUID answering does not prove ARCH_SET_CPUID works: try it in a child, which exits at once.
    probe = "import ctypes, sys; libc = ctypes.CDLL(None); sys.exit(0 if libc.syscall(158, 0x1012, 0) == 0 else 1)"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    return completed.returncode == 0


def unavailable() -> str | None:
    """Why a CPU view cannot run here, or None if it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    if shutil.which("cc") is None:
        return "needs a C compiler (cc) to build the preload library"
    if not _cpuid_faulting_supported():
        return "this CPU or kernel does not support CPUID faulting (arch_prctl ARCH_SET_CPUID)"
    return None


def build_library(directory: str | os.PathLike | None = None) -> Path:
    """Compile the preload library (once per source version) and return its path."""
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    directory = Path(directory or Path(tempfile.gettempdir()) / f"hf_distill_cpu_view_{os.getuid()}")
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"cpu_view_{digest}.so"
    if library.is_file():
        return library
    source = directory / f"cpu_view_{digest}.c"
    source.write_text(_SOURCE)
    partial = directory / f".cpu_view_{digest}.{os.getpid()}.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(partial), str(source)], check=True)
    os.replace(partial, library)  # atomic: concurrent builders each write their own file first
    return library


def cpu_view_env(view: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which a child process sees `view` ("avx2" or "avx512_no_vnni") instead of this CPU."""
    if view not in VIEWS:
        raise ValueError(f"unknown CPU view {view!r}; choose one of {VIEWS}")
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"cannot present a {view} CPU: {reason}")
    env = dict(os.environ if base is None else base)
    preload = str(build_library())
    env["LD_PRELOAD"] = f"{preload} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else preload
    env[ENV_VARIABLE] = view
    return env
