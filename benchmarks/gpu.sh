#!/usr/bin/env bash
# Side-by-side GPU benchmark against the original BiRefNet (benchmarks/compare_original.py) on one
# lent H100, finishing within about 8 minutes. Run from anywhere; it works in the repository root:
#
#     bash benchmarks/gpu.sh            # results appended to $OUT/<script>_gpu.jsonl
#
# The machine has no network. Expected there: Python 3.12 with PyTorch + torchvision (CUDA), JAX
# with CUDA, flax, optax, orbax. Brought along (git-ignored, carried with the working tree):
# .orig/BiRefNet (the original checkout) and .whl/ (kornia and kornia_rs wheels, installed here
# offline). Our package is used from this checkout via PYTHONPATH (nothing installed).
#
# Not known to be on the image, and needed: einops, safetensors, pillow, tqdm, ml_dtypes (our core)
# and timm, einops, huggingface_hub, opencv (importing the original's model). They cannot be
# downloaded there: a missing one stops the script at once with its name (add its wheel to .whl/).
#
# Environment: OUT (results folder; default benchmarks/results), PYTHON (default python3, else
# python), BUDGET_S (seconds for the whole script; default 465).
set -uo pipefail

start=$SECONDS
budget=${BUDGET_S:-465}
deadline=$((start + budget))
cd "$(dirname "$0")/.." || exit 2
root=$PWD
OUT=${OUT:-$root/benchmarks/results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
original=.orig/BiRefNet
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

fail() { echo "gpu.sh: $*" >&2; exit 2; }

[ -f "$original/models/birefnet.py" ] || fail "no original checkout at $original (carry .orig/BiRefNet)"

if ! "$PYTHON" -c "import kornia, kornia_rs" 2>/dev/null; then
  compgen -G ".whl/*.whl" >/dev/null || fail "kornia is missing and .whl/ has no wheels (carry .whl)"
  "$PYTHON" -m pip install --quiet --no-index --no-deps .whl/*.whl || fail "offline install of .whl/*.whl failed"
fi

missing=$("$PYTHON" - <<'EOF'
import importlib
needed = {
    "our core": ["jax", "flax", "orbax.checkpoint", "numpy", "ml_dtypes", "einops", "safetensors", "PIL", "tqdm"],
    "the original": ["torch", "torchvision", "timm", "einops", "kornia", "huggingface_hub", "cv2"],
}
gone = []
for who, modules in needed.items():
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken install
            gone.append(f"{name} ({who}: {type(e).__name__}: {e})")
print("; ".join(gone))
EOF
)
[ -z "$missing" ] || fail "missing Python modules, no network to install them: $missing"

echo "== nvidia-smi"
nvidia-smi || fail "nvidia-smi failed: no GPU?"
echo "== versions"
"$PYTHON" - <<'EOF' || fail "JAX or PyTorch does not see the GPU"
import platform, sys
import jax, flax, torch, torchvision
print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__,
      "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)
print("jax devices", jax.devices(), "torch", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
sys.exit(0 if jax.default_backend() == "gpu" and torch.cuda.is_available() else 1)
EOF
echo "== results -> $OUT/{compare_original,train_step}_gpu.jsonl"

# Most important first; each part is one run of a benchmark script (compare_original.py: the
# forward; train_step.py: one training step) with fresh workers per configuration (ours compiles
# for ~30-60 s each), stopped at the deadline by `timeout`. Lines of finished configurations are
# already in the results files when a part is cut short.
# float16 = the original under float16 autocast (how it is usually run on a GPU) against ours in bfloat16.
parts=(
  "compare_original --backbones swin_v1_l --batch-sizes 1 --dtypes float16"
  "compare_original --backbones swin_v1_l --batch-sizes 4 --dtypes float16"
  "train_step --backbones swin_v1_l --batch-sizes 2 --dtypes float16 --warmup 2 --repeats 5"
  "compare_original --backbones swin_v1_l --batch-sizes 1 --dtypes float32"
  "compare_original --backbones swin_v1_t --batch-sizes 1 4 --dtypes float16 float32"
)
status=0
for part in "${parts[@]}"; do
  left=$((deadline - SECONDS))
  if ((left < 90)); then
    echo "== skipped (only ${left} s left): $part"
    continue
  fi
  echo "== $part (${left} s left)"
  script=${part%% *}
  options=${part#* }
  # shellcheck disable=SC2086  # $options is a list of options
  timeout -k 5 "$left" "$PYTHON" "benchmarks/$script.py" --original "$original" \
    --original-python "$PYTHON" --resolution 1024 --warmup 2 --repeats 10 --out "$OUT/${script}_gpu.jsonl" $options
  rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "== cut at the deadline: $part"
  elif ((rc != 0)); then
    status=$rc
  fi
done
echo "== done in $((SECONDS - start)) s"
exit $status
