"""Warnings a user should not see are not shown; what they mean is said once."""
import subprocess
import sys

SCRIPT = """
import logging, sys
logging.basicConfig(level="INFO", stream=sys.stderr, format="%(name)s: %(message)s")
import hotpeft.model
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
for _ in range(3):  # what bitsandbytes logs at import on a CPU with AVX-512 BF16 and no `kernels` package
    bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
bnb.warning("an unrelated bitsandbytes warning")
import bitsandbytes, peft  # the real imports, after ours
"""


def test_the_bitsandbytes_kernels_warning_becomes_one_explanation():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install kernels" not in r.stderr and "kernels-community" not in r.stderr
    assert r.stderr.count("optional fused nf4 kernel") == 1 and "nothing to install" in r.stderr
    assert "an unrelated bitsandbytes warning" in r.stderr  # only that one message is filtered
