"""ssbsn.allocator: large tensors on transparent huge pages, judged by the kernel's own count
of the process's page faults and resident memory (a fresh interpreter each time)."""
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import resource, sys
if sys.argv[1] == "1":
    from ssbsn.allocator import use_huge_pages
    assert use_huge_pages()
import torch
def rss():
    return int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")][0])
t = torch.ones(64 << 20); del t           # 256 MB, far above glibc's mmap threshold
before, rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, rss()
for _ in range(4):
    t = torch.ones(64 << 20); del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, rss() - rss0)
"""


def _probe(apply: bool):
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], check=True,
                         capture_output=True, text=True, timeout=120, env=env).stdout.split()
    return int(out[0]), int(out[1])


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(),
                    reason="the kernel's transparent huge pages are off")
def test_large_tensors_fault_per_huge_page_and_memory_stays_flat():
    faults, grown_kib = _probe(True)
    plain, _ = _probe(False)
    assert plain >= 4 * (256 << 20) // 4096 // 2   # every new block faulted in per 4 KiB page
    assert faults < plain / 20
    assert grown_kib < 64 << 10                     # freed blocks go back: no growth


def test_respects_the_environment(monkeypatch):
    from ssbsn.allocator import VAR, use_huge_pages
    monkeypatch.setenv(VAR, "0")
    assert use_huge_pages() is False
