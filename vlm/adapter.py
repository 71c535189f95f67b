"""The one owner of adapter directories, LLaVA projector files, and the atomic writes of everything vlm hands on.

An adapter directory:

    adapter_config.json      AdapterConfig (vlm/config.py): backbones, image preprocessing, projector, template
    projector.safetensors    the projector's weights in float32, keys `0.weight`, `0.bias`, `2.weight`, ...

Adapters, imports and exports are written with `atomic_write`: whole, under a sibling name ending in `.partial`,
then renamed into place, so a reader never sees half of one. (Training checkpoints have their own rename and a
state file written last, in projector_training/checkpoint.py.) What is handed
on gets the permissions a new file of the user's would have (`make_shareable`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from vlm.config import AdapterConfig
from vlm.errors import ConfigError

__all__ = [
    "CONFIG_NAME",
    "LLAVA_PREFIX",
    "PROJECTOR_NAME",
    "atomic_write",
    "check_finished",
    "check_output_dir",
    "is_adapter_dir",
    "load_llava_projector",
    "make_shareable",
    "read_config",
    "read_projector",
    "write_adapter",
    "write_config",
]

CONFIG_NAME = "adapter_config.json"
PROJECTOR_NAME = "projector.safetensors"
LLAVA_PREFIX = "model.mm_projector."


# --------------------------------------------------------------------------------------------------
# Atomic, shareable writes


def atomic_write(path: str | Path, write: Callable[[Path], None], *, shareable: bool = True) -> Path:
    """Call `write(staging)` to create a file or directory at a temporary sibling of `path`, then rename it to
    `path` (replacing a file, or an absent or empty directory). If `write` fails, nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.partial")  # a retry after a crash clears what the crash left
    _remove(staging)
    try:
        write(staging)
        if shareable:
            make_shareable(staging)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        _remove(staging)
        raise
    return path


def check_output_dir(out: Path) -> None:
    """Refuse to write over anything: an existing adapter, model or file at `out` is somebody's work."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory; choose a new output path")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
    """Give `path` (a file, or a directory and everything in it) the usual permissions of a new file: 0666
    (directories 0777) less the umask. safetensors writes its files owner-only (0600), so a server that runs as
    another account (a vLLM or llama.cpp service) could not read an adapter or export otherwise."""
    path, mask = Path(path), _umask()
    if path.is_dir():
        for root, _subdirs, files in os.walk(path):  # each subdirectory comes round as a root
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# --------------------------------------------------------------------------------------------------
# Adapter directories


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a directory with an adapter config (finished or not)."""
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(directory: str | Path) -> AdapterConfig:
    """The adapter config of `directory`, with a ConfigError saying what is wrong with a missing or broken one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_NAME} in {directory}: is this an adapter directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return AdapterConfig.from_dict(data)


def read_projector(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The projector weights of a finished adapter directory (or training run)."""
    from safetensors.torch import load_file

    check_finished(directory)
    return load_file(str(Path(directory) / PROJECTOR_NAME), device=str(device))


def check_finished(directory: str | Path) -> None:
    """Raise a ConfigError unless `directory` holds projector weights (a finished run or an adapter)."""
    if not (Path(directory) / PROJECTOR_NAME).is_file():
        raise ConfigError(f"{directory} has no {PROJECTOR_NAME}; was the training run finished?")


def write_config(directory: str | Path, config: AdapterConfig) -> Path:
    """Write (atomically) `adapter_config.json` into `directory`."""
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    return atomic_write(Path(directory) / CONFIG_NAME, lambda staging: staging.write_text(text))


def write_adapter(directory: str | Path, config: AdapterConfig, projector: Mapping[str, torch.Tensor]) -> Path:
    """Write an adapter into `directory` (created if needed; other files there are left alone): the projector in
    float32, then the config, each file replaced atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in projector.items()}
    directory = Path(directory)
    atomic_write(directory / PROJECTOR_NAME, lambda staging: save_file(state, str(staging), metadata={"format": "pt"}))
    write_config(directory, config)
    return directory


# --------------------------------------------------------------------------------------------------
# LLaVA projector files


def load_llava_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original LLaVA `mm_projector.bin` / `.safetensors` into our projector's key names.

    Pickle files are read with `weights_only=True`, so they cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"projector file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types
            raise ConfigError(f"{path} is not a loadable weights-only PyTorch file: {e}") from e
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{path} holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len(LLAVA_PREFIX) :] if key.startswith(LLAVA_PREFIX) else key
        if name in ("weight", "bias"):  # LLaVA's linear projector is a bare nn.Linear
            name = f"0.{name}"
        if not re.fullmatch(r"\d+\.(weight|bias)", name):
            raise ConfigError(f"{path}: unexpected key {key!r}; expected '{LLAVA_PREFIX}<i>.weight' keys")
        out[name] = value
    return out
