"""`vlm-train`: align a projector between a frozen CLIP tower and a frozen causal LM.

    vlm-train --recipe llava15-stage1-14b --data blip_laion_cc_sbu_558k.json --image-root images/
    accelerate launch --config_file configs/ddp.yaml -m projector_training --recipe ...   # several GPUs
    vlm-train --recipe toy                                                                 # offline demo
    vlm-train --recipe toy-draft                                        # the demo's draft LM alone (toy runs it too)

The command resolves the config (the recipe's values, then a YAML file, then flags) and runs it: `train` (run.py)
for a recipe, or for `toy` and `toy-draft` the miniature world's build, alignment and evaluation. A user's mistake
is one line on stderr and exit status 2 (`VLM_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import logging
import os
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from projector_training.config import TrainConfig
from projector_training.recipes import RECIPES
from projector_training.run import train
from projector_training.toy.recipe import run_toy, run_toy_draft
from vlm.errors import ConfigError, VLMError

__all__ = ["build_parser", "main", "parse_args"]

logger = logging.getLogger("projector_training")


def _field_type(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def _from_yaml(name: str, value: Any) -> Any:
    """A YAML value as the field's type, as the same text given as a flag would be: YAML reads `2e-5` as a string
    and `no` as false, which `lr` and `resume` (`auto`, `no` or a path) do not mean."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields or value is None:
        return value
    kind = _field_type(fields[name])
    try:
        if kind is str and isinstance(value, bool):
            return "yes" if value else "no"
        if kind is bool and isinstance(value, str):
            return _parse_bool(value)
        if kind in (int, float) and isinstance(value, str):
            return kind(value)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{name}: {value!r} is not a {kind.__name__}") from e
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), for `--help`."""
    body = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig))).body[0].body
    docs = {}
    for field, doc in itertools.pairwise(body):
        text = getattr(doc, "value", None)
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(text, ast.Constant):
            docs[field.target.id] = " ".join(str(text.value).split())
    return docs


def build_parser() -> argparse.ArgumentParser:
    """`vlm-train`'s flags: --recipe, --config and one per TrainConfig field, documented by its docstring."""
    parser = argparse.ArgumentParser(
        prog="vlm-train",
        description="Align a vision projector to a frozen LM. Start from a recipe; override any field.",
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of field overrides")
    docs = _field_docs()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "recipe":
            continue
        kind = _field_type(field)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_parse_bool if kind is bool else kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=docs.get(field.name, "").replace("%", "%%") or None,
        )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config of `vlm-train ARGV`: the recipe's values, then the YAML file's, then the flags'."""
    args = parser_args = build_parser().parse_args(argv)
    cfg = RECIPES[args.recipe]
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"config file not found: {args.config}")
        overrides = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{args.config} must hold a mapping of field: value")
        cfg = cfg.replace(**{name: _from_yaml(name, value) for name, value in overrides.items()})
    flags = {k: v for k, v in vars(parser_args).items() if k not in ("recipe", "config") and v is not None}
    return cfg.replace(**flags)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    try:
        cfg = parse_args(argv)
        if cfg.recipe == "toy":
            run_toy(cfg)
        elif cfg.recipe == "toy-draft":
            run_toy_draft(cfg)
        else:
            train(cfg)
    except VLMError as e:
        if os.environ.get("VLM_DEBUG"):
            raise
        print(f"vlm-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
