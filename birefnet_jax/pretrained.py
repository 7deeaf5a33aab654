"""The checkpoints the BiRefNet authors release, by name: where each is published (the Hugging Face
repository and the original `.pth` file), its backbone, and how it was trained (resolution, task),
so that a released checkpoint runs as it was trained whichever way it is named:

    birefnet_jax.load("BiRefNet_HR")                       # a release name: fetched from the hub
    birefnet_jax.load("hf:ZhengPeng7/BiRefNet_HR")         # its hub repository
    birefnet_jax.load("BiRefNet_HR-general-epoch_130.pth") # a local file named as the release

all give a model whose `cfg.resolution` is (2048, 2048). `birefnet-jax models` prints the table.

The facts come from the original repository (README news and model zoo, `config.py`, its demo and
notebooks) and from the file names its GitHub release v1 publishes; the entries whose file name
has not been seen in the authors' own pages say so in `note`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import PurePath

from birefnet_jax.backbones import BACKBONES
from birefnet_jax.config import BiRefNetConfig

HUB_OWNER = "ZhengPeng7"
HUB_FILE = "model.safetensors"
RELEASE_PAGE = "https://github.com/ZhengPeng7/BiRefNet/releases/tag/v1"
# The range of sides the dynamic releases were trained at ("256x256 to 2304x2304", the original README).
DYNAMIC_SIZE = (256, 2304)
# The original's tasks (its `config.task`), which also name the column order of `birefnet-jax eval --task`.
TASKS = ("General", "General-2K", "Matting", "Portrait", "DIS5K", "COD", "HRSOD")


@dataclasses.dataclass(frozen=True)
class Release:
    """One released checkpoint.

    name: the name used here, the Hugging Face repository's (`ZhengPeng7/<name>`).
    release_files: the original PyTorch file(s) as the authors publish them (GitHub release v1 /
      their Google Drive); a local file with one of these names (any suffix) is this release.
    backbone: the backbone preset (`birefnet_jax.config.BACKBONES`).
    resolution: (height, width) it was trained at; the fixed size inference resizes to.
    dynamic_size: (smallest, largest) side for the releases trained at many sizes: they predict
      each image at its own size (`resolution='auto'`) up to largest x largest pixels; None for
      the fixed-size ones.
    mul_scl_ipt: the multi-scale input; only '' vs 'add' is not in the weights ('cat' is).
    task: the original's task setting it was trained under (`TASKS`).
    aliases: other names it goes by (earlier names of this package, the file's spelling).
    note: what is uncertain about the entry.
    """

    name: str
    release_files: tuple[str, ...]
    backbone: str
    task: str
    resolution: tuple[int, int] = (1024, 1024)
    dynamic_size: tuple[int, int] | None = None
    mul_scl_ipt: str = "cat"
    repo: str = ""
    hub_file: str = HUB_FILE
    aliases: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self):
        if not self.repo:
            object.__setattr__(self, "repo", f"{HUB_OWNER}/{self.name}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"release {self.name}: unknown backbone preset {self.backbone!r}")
        if self.task not in TASKS:
            raise ValueError(f"release {self.name}: task {self.task!r} not in {TASKS}")
        self.config()  # checks the resolution, the dynamic range and mul_scl_ipt

    @property
    def hub_spec(self) -> str:
        """`hf:<repo>`, as `birefnet_jax.load` takes it."""
        return f"hf:{self.repo}" if self.hub_file == HUB_FILE else f"hf:{self.repo}/{self.hub_file}"

    @property
    def url(self) -> str:
        """Where the hub file downloads from."""
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.hub_file}"

    @property
    def size_label(self) -> str:
        """The inference size, as the command line writes it: WxH, or the dynamic range."""
        if self.dynamic_size is not None:
            return f"dynamic {self.dynamic_size[0]}..{self.dynamic_size[1]}"
        return f"{self.resolution[1]}x{self.resolution[0]}"

    def config(self) -> BiRefNetConfig:
        """The architecture with the released decoder on this backbone, and how it runs."""
        return BiRefNetConfig(backbone=BACKBONES[self.backbone], mul_scl_ipt=self.mul_scl_ipt,
                              resolution=tuple(self.resolution), dynamic_size=self.dynamic_size)

    def settings(self) -> dict:
        """What loading applies to the converted weights: what the weights cannot tell. (`mul_scl_ipt`
        only when it is '' or 'add': 'cat' is read from the weights, which win.)"""
        out = {"resolution": tuple(self.resolution), "dynamic_size": self.dynamic_size}
        if self.mul_scl_ipt != "cat":
            out["mul_scl_ipt"] = self.mul_scl_ipt
        return out

    def fetch_hint(self) -> str:
        """How to get this checkpoint without the hub client: where to download, what to call it."""
        local = f"/path/to/{self.name}.safetensors"
        original = f" (or the original {' / '.join(self.release_files)} from {RELEASE_PAGE})" \
            if self.release_files else ""
        return (f"download {self.url}{original}, keep it named {self.name}.safetensors (or the original file "
                f"name) so that its settings ({self.size_label}) are picked up, and pass its path: "
                f"birefnet-jax predict -m {local} ..., or birefnet_jax.load({local!r})")


def _general(name, files, backbone="swin_v1_l", **kw) -> Release:
    return Release(name, tuple(files), backbone, kw.pop("task", "General"), **kw)


_TABLE = (
    # General use (the README's "general use" models, trained on many data sets).
    _general("BiRefNet", ["BiRefNet-general-epoch_244.pth"], aliases=("BiRefNet-general",)),
    _general("BiRefNet_HR", ["BiRefNet_HR-general-epoch_130.pth"], resolution=(2048, 2048),
             aliases=("BiRefNet-HR",)),
    _general("BiRefNet_dynamic", ["BiRefNet_dynamic-general-epoch_174.pth"], dynamic_size=DYNAMIC_SIZE),
    _general("BiRefNet_512x512", ["BiRefNet-general-resolution_512x512-fp16-epoch_216.pth"], resolution=(512, 512),
             note="the .pth name is inferred from the published ONNX file "
                  "BiRefNet-general-resolution_512x512-fp16-epoch_216.onnx"),
    _general("BiRefNet_lite", ["BiRefNet-general-bb_swin_v1_tiny-epoch_232.pth"], "swin_v1_t"),
    _general("BiRefNet_lite-2K", ["BiRefNet_lite-general-2K-epoch_232.pth"], "swin_v1_t", resolution=(1440, 2560),
             task="General-2K"),
    _general("BiRefNet-legacy", [],
             note="the earlier general-use weights of the hub repository; which release file they are is not "
                  "published, and Swin-L is assumed (loading reads the backbone from the weights)"),
    # Matting (soft alpha).
    _general("BiRefNet-matting", ["BiRefNet-matting-epoch_100.pth"], task="Matting"),
    _general("BiRefNet_HR-matting", ["BiRefNet_HR-matting-epoch_135.pth"], resolution=(2048, 2048), task="Matting",
             aliases=("BiRefNet-HR-matting",)),
    _general("BiRefNet_dynamic-matting", ["BiRefNet_dynamic-matting-epoch_159.pth"], dynamic_size=DYNAMIC_SIZE,
             task="Matting",
             note="not in the README's news: the training range is assumed to be BiRefNet_dynamic's, and the "
                  ".pth name is seen only in third-party code"),
    _general("BiRefNet_lite-matting", ["BiRefNet_lite-matting-epoch_110.pth"], "swin_v1_t", task="Matting",
             note="not in the README: the .pth name is seen only in third-party code"),
    _general("BiRefNet-portrait", ["BiRefNet-portrait-epoch_150.pth"], task="Portrait"),
    # The paper's benchmark models (one task's training sets each).
    _general("BiRefNet-DIS5K", ["BiRefNet-DIS-epoch_590.pth"], task="DIS5K"),
    _general("BiRefNet-DIS5K-TR_TEs", ["BiRefNet-massive-TR_DIS5K_TR_TEs-epoch_420.pth"], task="DIS5K",
             aliases=("BiRefNet-massive", "BiRefNet-massive-TR_DIS5K_TR_TEs"),
             note="trained on DIS5K's training and test sets; that the hub repository holds the 'massive' release "
                  "file is inferred from the matching training sets"),
    _general("BiRefNet-COD", ["BiRefNet-COD-epoch_125.pth"], task="COD"),
    _general("BiRefNet-HRSOD", ["BiRefNet-HRSOD_DHU-epoch_115.pth"], task="HRSOD",
             note="the README lists HRSOD models for six training-set mixes; the hub one is taken to be "
                  "DUTS+HRSOD+UHRSD (DHU)"),
)

RELEASES: dict[str, Release] = {r.name: r for r in _TABLE}
# Lower-cased spellings -> the release: its name and aliases; the stems of its release files.
_LOOKUP: dict[str, Release] = {key.lower(): r for r in _TABLE for key in (r.name, *r.aliases)}
_FILE_STEMS: dict[str, Release] = {PurePath(f).stem.lower(): r for r in _TABLE for f in r.release_files}

# The config of each release, under its name and aliases.
RELEASED_CONFIGS: dict[str, BiRefNetConfig] = {
    key: r.config() for r in _TABLE for key in (r.name, *r.aliases)}


def all_names() -> list[str]:
    """Every release name and alias."""
    return [key for r in _TABLE for key in (r.name, *r.aliases)]


def find_release(name: str) -> Release | None:
    """The release of a name or alias (any letter case), else None."""
    return _LOOKUP.get(str(name).lower())


def suggest(name: str) -> list[str]:
    """The releases whose name or alias is close to `name` (for 'did you mean'), by their names."""
    close = difflib.get_close_matches(str(name).lower(), list(_LOOKUP), n=5, cutoff=0.6)
    return list(dict.fromkeys(_LOOKUP[c].name for c in close))[:3]


def unknown_name_message(name: str) -> str:
    close = suggest(name)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{name!r} is not a released checkpoint; {hint}`birefnet-jax models` lists them"


def get_release(name: str) -> Release:
    """The release of a name or alias; KeyError with the closest names otherwise."""
    release = find_release(name)
    if release is None:
        raise KeyError(unknown_name_message(name))
    return release


def release_for_hub(repo: str, filename: str = HUB_FILE) -> Release | None:
    """The release a hub repository file holds (the repository id in any letter case), else None."""
    for r in _TABLE:
        if r.repo.lower() == repo.lower() and r.hub_file == filename:
            return r
    return None


def release_for_file(path: str | os.PathLike) -> Release | None:
    """The release a local file is, by its name: a release file's name or a release name, with any
    checkpoint suffix (`BiRefNet_HR-general-epoch_130.pth`, `BiRefNet_HR.safetensors`), or the hub
    file inside the Hugging Face cache (`.../models--ZhengPeng7--BiRefNet_HR/snapshots/<rev>/model.safetensors`).
    None otherwise."""
    path = PurePath(path)
    stem = path.stem.lower()
    if stem in _FILE_STEMS:
        return _FILE_STEMS[stem]
    if stem in _LOOKUP:
        return _LOOKUP[stem]
    for part in path.parts[:-1]:
        if part.startswith("models--") and part.count("--") == 2:
            _, owner, repo = part.split("--")
            return release_for_hub(f"{owner}/{repo}", path.name)
    return None


def get_preset(name: str) -> BiRefNetConfig:
    """The config of a released checkpoint (a name or alias of `RELEASES`), or the released decoder
    on a named backbone (`BACKBONES`)."""
    release = find_release(name)
    if release is not None:
        return release.config()
    if name in BACKBONES:
        return BiRefNetConfig(backbone=BACKBONES[name])
    close = suggest(name)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown preset {name!r}: neither a released checkpoint (`birefnet-jax models`) nor a backbone "
                   f"{sorted(BACKBONES)}.{hint}")


def table_rows() -> list[tuple[str, ...]]:
    """(name, backbone, resolution, task, hub repository, release file) for every release."""
    return [(r.name, r.backbone, r.size_label, r.task, r.repo, ", ".join(r.release_files) or "-") for r in _TABLE]


__all__ = [
    "DYNAMIC_SIZE",
    "RELEASED_CONFIGS",
    "RELEASES",
    "TASKS",
    "Release",
    "all_names",
    "find_release",
    "get_preset",
    "get_release",
    "release_for_file",
    "release_for_hub",
    "suggest",
    "table_rows",
]
