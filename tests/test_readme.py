"""The README's commands run as written, as far as they run offline.

Every line of its ```bash blocks is checked: `birefnet-jax <sub> ...` parses with the command's own
parser (every flag one that subcommand has, spelled out in full), `python eval.py ...` with the
`eval` subcommand's, `python train.py ...` names a config that exists and fields it has,
`python benchmarks/<script>.py ...` uses flags the script's `--help` lists, and `pip install`
names extras that pyproject.toml defines. A command of no known kind fails the test: add a check for
it. The `birefnet-jax` lines of docs/*.md are parsed too. The Python quickstart runs for real on a
tiny model saved as `ckpt/` in a temporary folder; every ```python block at least compiles.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a shell block as argv: continuation lines joined, comments dropped, `&&` / `;`
    / `|` chains split, leading `NAME=value` environment assignments removed."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "|", "||"):
                while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                    current.pop(0)
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def readme_commands() -> list[list[str]]:
    return [argv for block in code_blocks(README.read_text(), "bash") for argv in commands(block)]


def cli_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `birefnet-jax` line of the README and docs/*.md."""
    found = []
    for path in [README, *DOCS]:
        for block in code_blocks(path.read_text(), "bash"):
            found += [(path.name, argv) for argv in commands(block) if argv[0] == "birefnet-jax"]
    return found


def _id(argv: list[str]) -> str:
    return " ".join(argv)[:70]


def _where_id(item: tuple[str, list[str]]) -> str:
    return f"{item[0]}:{_id(item[1])}"


def flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("-") and a not in ("-", "--")]


# --------------------------------------------------------------------------------------------------
# birefnet-jax and python eval.py


def subparsers() -> dict[str, argparse.ArgumentParser]:
    from birefnet_jax.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def check_cli(argv: list[str]) -> None:
    """`argv` (after the program name) parses, and every flag is one of its subcommand's, in full
    (argparse would also take an abbreviation)."""
    from birefnet_jax.cli import build_parser

    sub = argv[0]
    parsers = subparsers()
    assert sub in parsers, f"birefnet-jax has no subcommand {sub!r} (has {sorted(parsers)})"
    known = {s for action in parsers[sub]._actions for s in action.option_strings}
    unknown = [f for f in flags(argv[1:]) if f not in known]
    assert not unknown, f"birefnet-jax {sub} has no option {unknown} (has {sorted(known)})"
    args = build_parser().parse_args(argv)
    assert args.command == sub


def test_the_readme_uses_every_subcommand():
    used = {argv[1] for argv in readme_commands() if argv[0] == "birefnet-jax"}
    assert used >= {"predict", "export", "convert", "verify", "eval"}, used


@pytest.mark.parametrize("sub", ["convert", "verify", "predict", "export", "eval"])
def test_each_subcommand_has_help(sub, capsys):
    from birefnet_jax.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([sub, "--help"])
    assert exit_.value.code == 0
    assert f"usage: birefnet-jax {sub}" in capsys.readouterr().out


@pytest.mark.parametrize("item", cli_commands(), ids=_where_id)
def test_birefnet_jax_lines_parse(item):
    _, argv = item
    check_cli(argv[1:])


def test_the_check_catches_what_it_should():
    check_cli(["predict", "-m", "ckpt/", "-o", "out/", "photos/", "--cutout"])
    for bad in (["predict", "-m", "ckpt/", "-o", "out/", "photos/", "--cut"],  # an abbreviation
                ["predict", "-m", "ckpt/", "-o", "out/", "photos/", "--no-such-flag"],
                ["export", "ckpt/", "model.jaxexport", "--batch", "0"]):  # a bad value
        with pytest.raises((AssertionError, SystemExit)):
            check_cli(bad)
    assert commands("A=1 birefnet-jax predict -m x \\\n  -o y in  # comment\npip install -e . && echo") == [
        ["birefnet-jax", "predict", "-m", "x", "-o", "y", "in"], ["pip", "install", "-e", "."], ["echo"]]


# --------------------------------------------------------------------------------------------------
# Every other command of the README


def check_eval_py(argv: list[str]) -> None:
    assert (ROOT / "eval.py").is_file()
    check_cli(["eval", *argv[2:]])


def check_train_py(argv: list[str]) -> None:
    """train.py's own flags, a config file that exists, and `--config.<field>` overrides it has."""
    source = (ROOT / "train.py").read_text()
    defined = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    assert "config" in defined, defined
    args = argv[2:]
    config_path = None
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if name.startswith("config."):
            continue
        assert name in defined, f"train.py has no flag --{name} (has {sorted(defined)})"
        if name == "config":
            config_path = value or args[i + 1]
    assert config_path, "train.py needs --config"
    assert (ROOT / config_path).is_file(), config_path
    overrides = [a[len("--config."):].split("=", 1)[0] for a in args if a.startswith("--config.")]
    if overrides:
        pytest.importorskip("ml_collections")
        import importlib

        sys.path.insert(0, str(ROOT))
        try:
            module = importlib.import_module(config_path.removesuffix(".py").replace("/", "."))
        finally:
            sys.path.remove(str(ROOT))
        config = module.get_config()
        for field in overrides:
            node = config
            for part in field.split("."):
                assert part in node, f"{config_path} has no field {field}"
                node = node[part]


def check_script(argv: list[str]) -> None:
    """A benchmark script that exists, and (for Python) flags its --help lists."""
    runner, script = argv[0], argv[1]
    assert (ROOT / script).is_file(), script
    if runner == "bash":
        return
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = set(re.findall(r"--[\w-]+", out.stdout))
    unknown = [f for f in flags(argv[2:]) if f not in listed]
    assert not unknown, f"{script} has no option {unknown}"


def check_pip(argv: list[str]) -> None:
    """Extras of this package that pyproject.toml defines (JAX's own extras are JAX's business)."""
    assert argv[:2] == ["pip", "install"], argv
    from importlib.metadata import metadata

    extras = set(metadata("birefnet-jax").get_all("Provides-Extra") or ())
    assert extras, "birefnet-jax is not installed (pip install -e .)"
    for target in argv[2:]:
        match = re.fullmatch(r"(\.|birefnet-jax)\[([\w,-]+)\]", target)
        if match:
            missing = set(match.group(2).split(",")) - extras
            assert not missing, f"{target}: no extra {missing} in pyproject.toml"


def check_readme_command(argv: list[str]) -> None:
    if argv[0] == "birefnet-jax":
        check_cli(argv[1:])
    elif argv[:2] == ["python", "eval.py"]:
        check_eval_py(argv)
    elif argv[:2] == ["python", "train.py"]:
        check_train_py(argv)
    elif argv[0] in ("python", "bash") and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        check_script(argv)
    elif argv[0] == "pip":
        check_pip(argv)
    else:
        raise AssertionError(f"no check for this README command; add one to {Path(__file__).name}: {argv}")


@pytest.mark.parametrize("argv", readme_commands(), ids=_id)
def test_readme_commands(argv):
    check_readme_command(argv)


# --------------------------------------------------------------------------------------------------
# Python


def test_every_python_block_compiles():
    blocks = code_blocks(README.read_text(), "python")
    assert blocks
    for i, block in enumerate(blocks):
        compile(block, f"README.md python block {i}", "exec")


def quickstart() -> str:
    (block,) = [b for b in code_blocks(README.read_text(), "python") if "birefnet_jax.load(" in b]
    return block


@pytest.mark.slow
def test_the_python_quickstart_runs(tmp_path, monkeypatch):
    """As written, in a folder holding a tiny model as `ckpt/` and one photo in `photos/`."""
    from PIL import Image

    from birefnet_jax.backbones.swin import SwinConfig
    from birefnet_jax.checkpoint import save_model
    from birefnet_jax.config import BiRefNetConfig
    from birefnet_jax.model import random_model

    cfg = BiRefNetConfig(backbone=SwinConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2),
                         mul_scl_ipt="", cxt_num=0, squeeze_block="", dec_att="", resolution=(64, 64))
    save_model(random_model(cfg, seed=0), tmp_path / "ckpt")
    (tmp_path / "photos").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photos" / "cat.jpg")
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(quickstart(), "README.md quickstart", "exec"), namespace)

    probs = np.asarray(namespace["probs"])
    assert probs.shape == (2, 64, 64, 1) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    with Image.open(tmp_path / "out" / "cat.png") as mask:
        assert mask.size == (80, 48) and mask.mode == "L"


# --------------------------------------------------------------------------------------------------
# Links


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    """Every relative link of the page names a file that exists, and a heading that exists in it."""
    if not page.exists():
        pytest.skip(f"{page.name} does not exist")
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"
