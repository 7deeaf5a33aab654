"""Reading original checkpoints (`.safetensors` without torch, `.pth` with it) and writing
`.safetensors` atomically."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np

from birefnet_jax.io.files import atomic_path

PREFIXES = ("module.", "_orig_mod.")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")


class CheckpointReadError(ValueError):
    """A checkpoint file could not be read: names the file and the likely cause."""


def strip_prefixes(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes, in any nesting."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointReadError(
            f"{path}: not a readable .safetensors file ({e}). The file may be truncated or still "
            "downloading; fetch it again.") from e
    except TypeError as e:  # bfloat16 tensors cannot be read as numpy directly
        raise CheckpointReadError(f"{path}: {e}") from e


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(
            f"{path}: reading .pth files needs PyTorch: pip install 'birefnet-jax[torch]' (a CPU build is "
            "enough: pip install torch --index-url https://download.pytorch.org/whl/cpu), or convert the file "
            "to .safetensors where PyTorch is installed") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt archives
        raise CheckpointReadError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}). The file may be "
            "truncated or corrupt; fetch it again.") from e
    for _ in range(2):
        if isinstance(obj, dict) and not any(hasattr(v, "shape") for v in obj.values()):
            inner = [k for k in _WRAPPERS if isinstance(obj.get(k), dict)]
            if not inner:
                break
            obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            t = v.detach().cpu()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            out[k] = t.numpy()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The original state dict of a `.pth` or `.safetensors` file, as numpy arrays with the
    prefixes stripped; half-precision tensors come back as float32."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd = _read_safetensors(path)
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = _read_pth(path)
    else:
        raise CheckpointReadError(f"{path}: unknown checkpoint format {suffix!r}; expected .pth or .safetensors")
    if not sd:
        raise CheckpointReadError(f"{path}: contains no tensors")
    half = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
    sd = {k: v.astype(np.float32) if v.dtype in half else v for k, v in sd.items()}
    return strip_prefixes(sd)


HUB_PREFIX = "hf:"


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local path, or `hf:<repo_id>[/<file>]` downloaded with huggingface_hub (the default file
    is `model.safetensors`, as in the released BiRefNet repositories).

    A file already in huggingface_hub's cache is used without the network. Otherwise the hub is
    asked once, without retries, whether the file is there (one HEAD request): without a network
    that fails at once with a message, rather than after huggingface_hub's own retries (which
    back off for half a minute, warning at every step); only then is it downloaded.
    """
    spec = str(spec)
    if not spec.startswith(HUB_PREFIX):
        return Path(spec)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointReadError("hf: checkpoints need huggingface_hub: pip install 'birefnet-jax[hub]'") from None
    repo, filename = parse_hub_spec(spec)
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, local_files_only=True))
    except Exception:  # not in the cache (or the cache is unreadable): ask the hub
        pass
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id=repo, filename=filename))
        return Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # offline, unknown repository or file, HTTP errors: all end the same way
        raise CheckpointReadError(
            f"cannot download {filename} from the Hugging Face repository {repo} ({type(e).__name__}: {e}). "
            "Without a network, download the file elsewhere and pass its local path") from e


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """`hf:<owner>/<repo>[/<file>]` -> (repo id, file name; `model.safetensors` by default)."""
    parts = spec[len(HUB_PREFIX):].split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointReadError(f"{spec}: expected hf:<owner>/<repo>[/<file>]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"


def cache_root() -> Path:
    """Where converted downloads are kept: $BIREFNET_JAX_CACHE, else $XDG_CACHE_HOME/birefnet-jax,
    else ~/.cache/birefnet-jax."""
    if os.environ.get("BIREFNET_JAX_CACHE"):
        return Path(os.environ["BIREFNET_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "birefnet-jax"


def write_safetensors(state_dict: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (a crash leaves either the old file or none, never half a file), with the
    permissions of the user's umask."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.array(v, order="C", copy=None) for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    return Path(path)
