import os

# Tests never reach the network: huggingface_hub refuses at once (the hub tests replace it anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity is defined in float32 with exact matmuls (see tests/reference/README.md).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """case -> path of the recipe state dict written as .safetensors (the user's path)."""
    from reference_models import recipe_state_dict

    from birefnet_jax.convert import write_safetensors

    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = write_safetensors(recipe_state_dict(case), root / f"{case}.safetensors")
        return cache[case]

    return get
