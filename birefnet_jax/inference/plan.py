"""The planning stage of `predict`: which inputs, which outputs, what is already done.

Reads the file system and decides, before any model is loaded: the inputs named by the specs (see
`inputs.list_inputs`), minus anything inside the output folder (our own outputs are no inputs); the
images' output paths (see `outputs.plan_outputs`), those whose outputs all exist skipped unless
`overwrite`; and the videos, which `video.predict_videos` plans for itself. Nothing is written or
deleted here; `PredictPlan.remove_stale_temporaries` clears what a killed run left, when the caller
is about to write.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from birefnet_jax.inference.inputs import InputItem, list_inputs
from birefnet_jax.inference.outputs import OutputPaths, plan_outputs, remove_stale_temporaries
from birefnet_jax.io.images import VIDEO_EXTENSIONS

InputSpecs = str | os.PathLike | Sequence[str | os.PathLike]


@dataclasses.dataclass(frozen=True)
class PredictPlan:
    """What one `predict` call has to do.

    images: the images to predict, each with its output paths (only those not done, unless
      `overwrite`), in input order.
    videos: every video input (skipping is decided per video, by `video.predict_videos`).
    skipped: images whose outputs all exist (left alone).
    """

    output: Path
    kinds: tuple[str, ...]
    images: list[tuple[InputItem, OutputPaths]]
    videos: list[InputItem]
    skipped: int

    def remove_stale_temporaries(self) -> int:
        """Delete the temporary files a killed run left beside the outputs about to be written."""
        return remove_stale_temporaries([paths for _, paths in self.images])


def plan_predictions(inputs: InputSpecs, output: str | os.PathLike, *, outputs: Sequence[str] = ("mask",),
                     overwrite: bool = False) -> PredictPlan:
    """The plan for predicting `inputs` (files, folders, globs, list files) into `output`.

    Raises ValueError (`InputError` for specs that name nothing usable) when there is nothing to do
    at all, and FileExistsError if `output` is a file.
    """
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise ValueError("no inputs given")
    items = list_inputs(specs)
    if not items:
        raise ValueError(f"no images found in {', '.join(map(str, specs))}")
    kinds = tuple(dict.fromkeys(outputs))
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; give a folder")
    out_root = output.resolve()
    items = [it for it in items if out_root not in it.path.resolve().parents]  # our own outputs are no inputs
    if not items:
        raise ValueError(f"the inputs hold nothing outside the output folder {output}")
    videos = [it for it in items if it.path.suffix.lower() in VIDEO_EXTENSIONS]
    images = [it for it in items if it.path.suffix.lower() not in VIDEO_EXTENSIONS]
    todo, skipped = [], 0
    for item, paths in zip(images, plan_outputs([it.rel for it in images], output, kinds), strict=True):
        if not overwrite and not paths.missing():
            skipped += 1
        else:
            todo.append((item, paths))
    return PredictPlan(output=output, kinds=kinds, images=todo, videos=videos, skipped=skipped)
