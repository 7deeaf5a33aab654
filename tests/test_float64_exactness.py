"""The port is exact, not just close: run in float64, every reference case matches the original
run in float64 to ~1e-13. (In float32 both sides carry ~3e-5 of rounding, which is what the
1e-4 tolerance of tests/test_parity.py absorbs.) The float64 logits were produced by the
original with tests/make_float64_reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import MODEL_CASES, REF, case_arrays, case_overrides, to_float64

import birefnet_jax
from birefnet_jax.verify import relative_error


@nnx.jit
def _forward(model, x):
    return model(x)


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES)
def test_float64_matches_original_float64(case, converted):
    expected = np.load(REF / f"model_{case}_float64.npz")
    arrays = case_arrays(case)
    with jax.enable_x64(True):
        model = to_float64(birefnet_jax.load(converted(case), **case_overrides(case)))
        for name in expected.files:
            x = arrays["input" + name[len("output"):]].transpose(0, 2, 3, 1).astype(np.float64)
            out = _forward(model, x)
            assert out.dtype == jnp.float64
            err = relative_error(np.asarray(out).transpose(0, 3, 1, 2), expected[name])
            assert err < 1e-10, (case, name, err)
