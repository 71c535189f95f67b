"""File permissions for what vlm writes for others to read: adapters and exports.

safetensors (0.8) writes its files owner-only (0600), so a server that runs as another account (a vLLM or
llama.cpp service) could not read an adapter or export. What vlm hands on gets the permissions a newly
created file of the user's would have: 0666 (directories 0777) less the process umask.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["make_shareable"]


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read it by setting it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the usual permissions of a new file."""
    path, mask = Path(path), _umask()
    if path.is_dir():
        for root, _subdirs, files in os.walk(path):  # each subdirectory comes round as a root
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
