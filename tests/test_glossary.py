"""docs/glossary.md covers every config field, and every BiRefNetConfig field is explained in config.py."""

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from pathlib import Path

from birefnet_jax import config

GLOSSARY = Path(__file__).resolve().parents[1] / "docs" / "glossary.md"


def _backbone_classes() -> list[type]:
    """The backbone config classes: BACKBONE_KINDS, else the BackboneConfig union, else the backbone table."""
    kinds = getattr(config, "BACKBONE_KINDS", None)
    classes = list(kinds.values()) if kinds else list(typing.get_args(getattr(config, "BackboneConfig", None)))
    if not classes:
        from birefnet_jax import backbones

        classes = [spec.config for spec in backbones.TABLE.values()]
    assert classes and all(dataclasses.is_dataclass(c) for c in classes), classes
    assert type(config.BiRefNetConfig().backbone) in classes
    return classes


def test_every_field_is_in_the_glossary():
    text = GLOSSARY.read_text()
    missing = [f.name for f in dataclasses.fields(config.BiRefNetConfig) if f"| `{f.name}` |" not in text]
    for cls in _backbone_classes():
        missing += [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls)
                    if f"| `{cls.__name__}.{f.name}` |" not in text]
    assert not missing, f"add a row to {GLOSSARY.name} for: {missing}"


def _comment_problems(source: str) -> list[str]:
    """What is wrong with the comments of BiRefNetConfig's fields in ``source`` (config.py's text)."""
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "BiRefNetConfig"]
    fields = {n.target.id: n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    problems = [f"{name}: not a field of BiRefNetConfig" for name in
                set(fields) ^ {f.name for f in dataclasses.fields(config.BiRefNetConfig)}]
    for name, node in fields.items():
        above = node.lineno - 1
        if above not in comments or not lines[above - 1].strip().startswith("#") or not lines[above - 1].strip("# \n"):
            problems.append(f"{name}: no comment line directly above")
        elif above - 1 in comments and lines[above - 2].strip().startswith("#"):
            problems.append(f"{name}: more than one comment line above")
        if any(line in comments for line in range(node.lineno, node.end_lineno + 1)):
            problems.append(f"{name}: trailing comment (put it in the line above)")
    return problems


def test_every_birefnet_field_has_one_comment_line_above_it():
    source = Path(inspect.getsourcefile(config.BiRefNetConfig)).read_text()
    assert _comment_problems(source) == []
    # The check itself: a removed, a doubled and a trailing comment are each caught.
    lines = source.splitlines(keepends=True)
    (at,) = [i for i, line in enumerate(lines) if line.startswith("    cxt_num: int")]
    assert _comment_problems("".join(lines[: at - 1] + lines[at:])) == ["cxt_num: no comment line directly above"]
    doubled = "".join(lines[:at] + ["    # again\n"] + lines[at:])
    assert _comment_problems(doubled) == ["cxt_num: more than one comment line above"]
    trailing = "".join(lines[:at] + [lines[at].rstrip("\n") + "  # here\n"] + lines[at + 1 :])
    assert _comment_problems(trailing) == ["cxt_num: trailing comment (put it in the line above)"]
