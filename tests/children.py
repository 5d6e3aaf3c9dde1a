"""Code run in a fresh Python process, with that process's peak memory: what the hostile-input
tests measure (time and memory of one load or decode, apart from the test runner's own)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(code: str, timeout: float = 120) -> dict:
    """Run code in a fresh Python; it fills a dict named `out`, printed as one JSON line. Adds the
    child's peak memory in MB as out['peak_mb'] (VmHWM: its own address space's high-water mark;
    ru_maxrss would carry the parent's over)."""
    peak = (
        "\nout['peak_mb'] = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0] / 1024"
    )
    done = subprocess.run(
        [sys.executable, "-c", code + peak + "\nprint(json.dumps(out))\n"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
