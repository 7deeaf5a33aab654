"""Every reference model case, converted from a .safetensors file, matches the original's
outputs and intermediate features (relative L2 error < 1e-4 in float32)."""

import numpy as np
import pytest
from flax import nnx
from reference_models import case_arrays, case_overrides, model_case_params

import birefnet_jax
from birefnet_jax.verify import relative_error

TOL = 1e-4


@nnx.jit
def _features(model, x):
    model.decoder.capture_intermediates = True
    out = {f"backbone{i + 1}": f for i, f in enumerate(model.bb(x))}
    enc = model.encode(x)
    out.update({f"encoder{i + 1}": f for i, f in enumerate(enc)})
    out["squeeze"] = model.squeeze(enc[3])
    out["output"], inter = nnx.capture(model, nnx.Intermediate)(x)
    for name, var in inter["decoder"].items():
        value = var.get_value() if hasattr(var, "get_value") else var
        out[name.removesuffix("_out")] = value[0] if isinstance(value, tuple) else value
    model.decoder.capture_intermediates = False
    return out


@pytest.mark.parametrize("case", model_case_params())
def test_reference_case(case, converted):
    model = birefnet_jax.load(converted(case), **case_overrides(case))
    arrays = case_arrays(case)
    inputs = [k for k in arrays.files if k.startswith("input") and "/" not in k]
    assert inputs
    for name in inputs:
        feats = _features(model, arrays[name].transpose(0, 2, 3, 1))
        refs = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(name + "/")}
        refs["output"] = arrays["output" + name[5:]]
        assert set(refs) <= set(feats), set(refs) - set(feats)
        errors = {}
        for key, ref in refs.items():
            got = np.asarray(feats[key]).transpose(0, 3, 1, 2)
            assert got.shape == ref.shape, (name, key, got.shape, ref.shape)
            errors[key] = relative_error(got, ref)
        bad = {k: e for k, e in errors.items() if not e < TOL}
        assert not bad, f"{case}/{name}: {bad}"
