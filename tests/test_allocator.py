"""ghindex.allocator: building an Encoder keeps large freed blocks in the process (glibc), so the next
batch's tensors reuse them instead of faulting in fresh pages; the user's own malloc settings win."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ghindex import allocator

PROBE = """
import json, resource, torch, ghindex
ghindex.Encoder("smallcnn", 16, image_size=32)  # what every command that runs a model builds
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1 << 25).sum()  # a first 128 MiB block: faulted in either way
before = faults()
for _ in range(4):  # freed and allocated again, as a forward's per-layer tensors are
    torch.ones(1 << 25).sum()
print(json.dumps({"faults": faults() - before, "applied": ghindex.allocator.keep_freed_memory()}))
"""


def run_probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS and k != "GHINDEX_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, system = run_probe(), run_probe(GHINDEX_MALLOC="system")
    assert kept["applied"] is True and system["applied"] is False
    # 4 x 128 MiB = 131,072 pages of 4 KiB: faulted in again each time unless the block is kept
    assert system["faults"] > 100_000
    assert kept["faults"] < system["faults"] / 20


@pytest.mark.parametrize("env", [{"GHINDEX_MALLOC": "system"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                 {"MALLOC_MMAP_THRESHOLD_": "65536"}])
def test_the_processs_own_choice_is_left_alone(monkeypatch, env):
    monkeypatch.setattr(allocator, "_applied", None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert allocator._skip_reason()
    assert allocator.keep_freed_memory() is False
