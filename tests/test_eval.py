"""`birefnet-jax eval` (and eval.py, which runs it) and the metrics' file handling: reading odd images,
pairing by stem, the outputs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from birefnet_jax import cli
from birefnet_jax.metrics import (
    ALL_METRICS,
    TASK_COLUMNS,
    Evaluator,
    PairingError,
    columns_for,
    evaluate_pair,
    pair_by_stem,
    read_gray,
)

ROOT = Path(__file__).resolve().parents[1]


def eval_main(argv: list[str]) -> dict:
    """`birefnet-jax eval ARGV` (what `python eval.py ARGV` runs) in-process: argparse's usage errors
    exit 2; returns {(dataset, method): results} and raises what the command reports as `error: ...`."""
    return cli.run_eval(cli.parse_args(["eval", *argv]))


def test_read_gray_like_opencv(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    images = {
        "gray.png": gray,
        "rgb.png": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),
        "deep.png": rng.integers(0, 65536, (20, 30), dtype=np.uint16),
        "mask.jpg": np.repeat(gray[..., None], 3, axis=2),
    }
    for name, image in images.items():
        path = tmp_path / name
        cv2.imwrite(str(path), image)
        got = read_gray(path)
        assert got.dtype == np.uint8 and got.shape == (20, 30), name
        np.testing.assert_array_equal(got, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), err_msg=name)
    np.testing.assert_array_equal(read_gray(tmp_path / "deep.png"), (images["deep.png"] >> 8).astype(np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        read_gray(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="missing.png"):
        read_gray(tmp_path / "missing.png")


def test_pairing_by_stem():
    pairs = pair_by_stem(["p/b.png", "p/a.jpg"], ["g/a.png", "g/b.png"])
    assert pairs == [("a", "p/a.jpg", "g/a.png"), ("b", "p/b.png", "g/b.png")]
    with pytest.raises(PairingError) as e:
        pair_by_stem(["p/a.png", "p/x.png", "p/y.png", "p/z.png"], ["g/a.png", "g/w.png"])
    message = str(e.value)
    assert "3 predictions have no ground truth: x.png, y.png, z.png" in message
    assert "1 ground truth has no prediction: w.png" in message
    with pytest.raises(PairingError, match="share a stem"):
        pair_by_stem(["p/a.png", "p/a.jpg"], ["g/a.png"])


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """{data}/{dataset}/gt and {preds}/{method}/{dataset}, from the reference pairs."""
    root = tmp_path_factory.mktemp("eval")
    data = np.load(Path(__file__).parent / "reference" / "metrics.npz")
    pairs = [(data[f"pred{i}"], data[f"gt{i}"]) for i in range(4)]
    for i, (pred, gt) in enumerate(pairs):
        (root / "data" / "DIS-VD" / "gt").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "data" / "DIS-VD" / "gt" / f"im{i}.png"), gt)
        for method, p in (("good", pred), ("inverted", 255 - pred)):
            (root / "preds" / method / "DIS-VD").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "preds" / method / "DIS-VD" / f"im{i}.png"), p)
    return root, pairs


def test_eval_layout_writes_table_json_csv_plots(layout):
    root, pairs = layout
    out = root / "results"
    results = eval_main([
        "--pred_root", str(root / "preds"), "--data_root", str(root / "data"), "--datasets", "DIS-VD",
        "--save_dir", str(out), "--task", "COD", "--workers", "2", "--per_image",
    ])
    assert set(results) == {("DIS-VD", "good"), ("DIS-VD", "inverted")}
    direct = Evaluator()
    for pred, gt in pairs:
        direct.update(pred, gt)
    expected = direct.results()
    stored = json.loads((out / "results.json").read_text())["results"]["DIS-VD"]["good"]
    for key in ("S", "MAE", "wF", "HCE", "MBA", "maxF", "meanE", "E_adp", "maxBIoU"):
        assert stored[key] == pytest.approx(expected[key], rel=1e-12), key
    np.testing.assert_allclose(stored["F_curve"], expected["F_curve"], rtol=1e-12)
    with open(out / "results.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Dataset", "Method", *columns_for("COD"), "count"]
    assert [r[1] for r in rows[1:]] == ["good", "inverted"]
    table = (out / "DIS-VD_eval.txt").read_text()
    assert table.index("Smeasure") < table.index("wFmeasure") < table.index("meanFm")  # COD's order
    for name in ("DIS-VD_pr.png", "DIS-VD_fm.png", "DIS-VD--good_per_image.csv"):
        assert (out / name).stat().st_size > 0, name
    assert stored["S"] > json.loads((out / "results.json").read_text())["results"]["DIS-VD"]["inverted"]["S"]


def test_eval_single_folder_and_pairing_error(layout, tmp_path):
    root, _ = layout
    results = eval_main([
        "--pred_dir", str(root / "preds" / "good" / "DIS-VD"), "--gt_dir", str(root / "data" / "DIS-VD" / "gt"),
        "--save_dir", str(tmp_path / "one"), "--metrics", "S+MAE", "--no_plots",
    ])
    assert set(results) == {("DIS-VD", "DIS-VD")}
    assert set(results["DIS-VD", "DIS-VD"]) == {"count", "S", "MAE"}
    extra = tmp_path / "preds"
    extra.mkdir()
    for name in ("im0.png", "im1.png", "stray.png"):
        cv2.imwrite(str(extra / name), np.zeros((8, 8), np.uint8))
    with pytest.raises(PairingError, match=r"1 prediction has no ground truth: stray.png.*2 ground truths"):
        eval_main(["--pred_dir", str(extra), "--gt_dir", str(root / "data" / "DIS-VD" / "gt"),
                       "--save_dir", str(tmp_path / "two")])


def test_skeletons_from_a_ske_folder(tmp_path):
    # As the original: a ske/ folder next to gt/ supplies HCE's skeletons.
    data = np.load(Path(__file__).parent / "reference" / "metrics.npz")
    pred, gt = data["pred0"], data["gt0"]
    for sub in ("gt", "ske", "pred"):
        (tmp_path / sub).mkdir()
    cv2.imwrite(str(tmp_path / "gt" / "a.png"), gt)
    cv2.imwrite(str(tmp_path / "pred" / "a.png"), pred)
    given = np.zeros(gt.shape, bool)
    given[gt.shape[0] // 2, :] = True  # deliberately not the real skeleton
    cv2.imwrite(str(tmp_path / "ske" / "a.png"), given.astype(np.uint8) * 255)
    results = eval_main(["--pred_dir", str(tmp_path / "pred"), "--gt_dir", str(tmp_path / "gt"),
                             "--metrics", "HCE", "--save_dir", str(tmp_path / "out"), "--no_plots"])
    (hce,) = [r["HCE"] for r in results.values()]
    assert hce == evaluate_pair(pred, gt, ["HCE"], skeleton=given).HCE
    assert hce != evaluate_pair(pred, gt, ["HCE"]).HCE


@pytest.mark.slow
def test_eval_from_checkpoint_predicts_then_scores(tmp_path, converted):
    """--ckpt: images of any size are resized to the checkpoint's resolution, predicted, brought
    back to the ground truth's size, written as PNG and scored."""
    from birefnet_jax.cli import main as cli_main

    data = tmp_path / "data" / "DS"
    (data / "im").mkdir(parents=True)
    (data / "gt").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(150, 100), (90, 130)]):
        cv2.imwrite(str(data / "im" / f"img{i}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4 : h // 2, w // 4 : w // 2] = 255
        cv2.imwrite(str(data / "gt" / f"img{i}.png"), gt)
    ckpt = tmp_path / "ckpt"
    assert cli_main(["convert", str(converted("swin_nobn")), str(ckpt), "--resolution", "128x128"]) == 0
    eval_main(["--ckpt", str(ckpt), "--data_root", str(tmp_path / "data"), "--datasets", "DS",
                   "--pred_root", str(tmp_path / "preds"), "--save_dir", str(tmp_path / "results")])
    preds = sorted((tmp_path / "preds").rglob("*.png"))
    assert [p.name for p in preds] == ["img0.png", "img1.png"]
    assert cv2.imread(str(preds[0]), cv2.IMREAD_GRAYSCALE).shape == (150, 100)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert "DS" in json.dumps(results)


# --------------------------------------------------------------------------- the user's mistakes


def _tree(*roots) -> dict:
    """Every path under ``roots`` with its bytes (None for a folder)."""
    return {str(p): None if p.is_dir() else p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*"))}


def _fails(args: list[str], cwd: Path, *roots) -> str:
    """Runs ``python eval.py args`` in ``cwd``: exit 2, ``error: ...`` on stderr, nothing under ``cwd`` or
    ``roots`` changed. Returns stderr."""
    before = _tree(cwd, *roots)
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert _tree(cwd, *roots) == before
    return proc.stderr


def _dataset(root: Path, name: str, with_images: bool = False):
    (root / name / "gt").mkdir(parents=True)
    cv2.imwrite(str(root / name / "gt" / "a.png"), np.full((8, 8), 255, np.uint8))
    if with_images:
        (root / name / "im").mkdir()
        cv2.imwrite(str(root / name / "im" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_unwritable_save_dir_fails_before_prediction(tmp_path, where):
    """--save_dir a file, or a folder below one: found before the checkpoint is even loaded (it does not exist)."""
    _dataset(tmp_path / "data", "DS", with_images=True)
    (tmp_path / "taken").write_text("not a folder")
    save_dir = tmp_path / "taken" if where == "is_a_file" else tmp_path / "taken" / "results"
    stderr = _fails(["--ckpt", str(tmp_path / "missing.safetensors"), "--data_root", str(tmp_path / "data"),
                     "--datasets", "DS", "--pred_root", str(tmp_path / "preds"), "--save_dir", str(save_dir)], tmp_path)
    assert f"--save_dir {save_dir}" in stderr
    expected = "is an existing file, not a folder" if where == "is_a_file" else "is not writable (Not a directory)"
    assert expected in stderr and "give a folder" in stderr
    assert not (tmp_path / "preds").exists()


@pytest.mark.parametrize("mistake", ["no_such_dataset", pytest.param("no_predictions", marks=pytest.mark.slow),
                                     pytest.param("no_such_method", marks=pytest.mark.slow)])
def test_missing_dataset_or_predictions_is_an_error(tmp_path, mistake):
    """A data set without gt/ or without predictions (even one among several) stops everything up front;
    an earlier results.json stays as it was."""
    for name in ("DIS-VD", "DIS-TE1"):
        _dataset(tmp_path / "data", name)
    (tmp_path / "preds" / "mine" / "DIS-VD").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "preds" / "mine" / "DIS-VD" / "a.png"), np.full((8, 8), 255, np.uint8))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.json").write_text('{"earlier": "run"}')
    datasets, extra = {
        "no_such_dataset": ("DIS-VD+DIS-TE9", []),
        "no_predictions": ("DIS-VD,DIS-TE1", []),
        "no_such_method": ("DIS-VD", ["--methods", "mine+theirs"]),
    }[mistake]
    args = ["--data_root", str(tmp_path / "data"), "--datasets", datasets, "--pred_root", str(tmp_path / "preds"),
            "--save_dir", str(tmp_path / "results"), *extra]
    stderr = _fails(args, tmp_path)
    if mistake == "no_such_dataset":
        assert "data set(s) not found under" in stderr and "DIS-TE9" in stderr
        assert "data sets there: DIS-TE1, DIS-VD" in stderr and "Check --datasets and --data_root" in stderr
    elif mistake == "no_predictions":
        assert "no predictions for data set(s) DIS-TE1" in stderr and "methods mine" in stderr
        assert "data sets with predictions: DIS-VD" in stderr
    else:
        assert "method(s) not found under" in stderr and "theirs; methods there: mine" in stderr
    with pytest.raises(ValueError, match="DIS-TE9"):  # the same check for callers of the library
        eval_main(["--data_root", str(tmp_path / "data"), "--datasets", "DIS-TE9",
                       "--pred_root", str(tmp_path / "preds"), "--save_dir", str(tmp_path / "results")])


@pytest.mark.parametrize("metrics", ["+", "", "S+Fmeasure"])
def test_bad_metrics_name_the_valid_ones(layout, tmp_path, capsys, metrics):
    """An argparse error (exit 2, usage and ``error:`` on stderr), so checked in-process."""
    root, _ = layout
    before = _tree(tmp_path, root)
    with pytest.raises(SystemExit) as e:
        eval_main(["--pred_root", str(root / "preds"), "--data_root", str(root / "data"), "--datasets", "DIS-VD",
                       "--metrics", metrics, "--save_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    stderr = capsys.readouterr().err
    problem = "unknown metric(s) Fmeasure" if metrics == "S+Fmeasure" else f"no metric in {metrics!r}"
    assert f"error: --metrics: {problem}" in stderr
    assert "'+'-separated names from S+MAE+E+F+WF+MBA+BIoU+MSE+HCE" in stderr
    assert _tree(tmp_path, root) == before


def test_help_names_every_metric_and_task():
    """`--help` spells the metric and task names without importing the metrics: the same names."""
    assert cli.EVAL_METRICS == ALL_METRICS
    assert set(cli.EVAL_TASKS) == set(TASK_COLUMNS)


def test_without_the_eval_extra_the_error_names_it(tmp_path):
    """The command line imports the metrics (OpenCV, scikit-image) only for `eval`; without them
    `eval` says which extra to install, and every other command still loads."""
    code = (
        "import sys\n"
        "sys.modules['cv2'] = None  # import cv2 now raises ImportError\n"
        "from birefnet_jax.cli import build_parser, main\n"
        "build_parser()\n"
        "sys.exit(main(['eval', '--pred_dir', 'p', '--gt_dir', 'g']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: " in proc.stderr and "pip install 'birefnet-jax[eval]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
