"""XLA_FLAGS for a process a test starts: this session's flags (such as the optimization level
``scripts/test.sh`` sets) with the test's own number of host devices."""

import os

_DEVICES = "--xla_force_host_platform_device_count"


def xla_flags(devices: int) -> str:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
    if devices > 1:
        flags.append(f"{_DEVICES}={devices}")
    return " ".join(flags)
