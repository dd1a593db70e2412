"""The daemon caps glibc's malloc arenas itself, unless the operator set MALLOC_ARENA_MAX."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Sixteen threads allocate at once, as association threads do; glibc gives each new thread an
# arena of its own until the cap. malloc_info() lists one <heap> per arena.
PROBE = """
import ctypes, sys, threading
from fabricatord.service import cap_malloc_arenas
capped = cap_malloc_arenas() if sys.argv[1] == "cap" else False
barrier = threading.Barrier(16)
def work():
    blocks = [ctypes.create_string_buffer(8192) for _ in range(32)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(16)]
for thread in threads: thread.start()
for thread in threads: thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
stream = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(capped, open(sys.argv[2]).read().count("<heap nr="))
"""


def arenas(tmp_path: Path, mode: str, environment: dict[str, str]) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | environment
    command = [sys.executable, "-c", PROBE, mode, str(tmp_path / "info.xml")]
    capped, count = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
    return capped, int(count)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_arenas_are_capped_at_two_unless_the_operator_chose(tmp_path: Path) -> None:
    assert arenas(tmp_path, "cap", {}) == ("True", 2)
    assert arenas(tmp_path, "none", {})[1] > 2  # what the cap prevents
    assert arenas(tmp_path, "cap", {"MALLOC_ARENA_MAX": "4"}) == ("False", 4)
