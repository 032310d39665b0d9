"""Training configuration: one dataclass, read from a TOML or JSON file, every field also a command-line flag.

    dre-slcl train run.toml --steps 200 --backend reference

Flags override the file; the file overrides the defaults below. Unknown keys and bad values are errors that
name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib's parser as the tomli package (the slcl extra installs it there)
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


@dataclass
class TrainConfig:
    # data
    tile_dir: str = ""                       # output of `dre-slcl tile` (patches/*.h5)
    reports: str = ""                        # report embeddings (.safetensors or .npy), one row per slide id
    out_dir: str = ""                        # checkpoints, bank, metrics.jsonl
    slide_dir: str | None = None             # where the slides are now, if moved since tiling
    # model
    encoder: str = "vit_small_patch16_224"   # any timm model name
    image_size: int = 256
    weights: str | None = None               # local weights file for the encoder (never downloaded)
    num_codewords: int = 64
    assignment: str = "soft"                 # soft (Deep TEN) or hard (VLAD)
    learnable_codewords: bool = True
    layers: int = 2                          # Transformer layers over the K residual tokens
    heads: int = 4
    backend: str = "auto"                    # dre_kernels backend of every hot op
    # memory bank
    bank_dtype: str = "auto"                 # auto (the AMP dtype: bfloat16 on GPU, float32 off AMP), float32, ...
    bank_momentum: float = 0.0
    bank_rows_per_slide: int | None = None   # cap on bank rows per slide and step (None: all the others)
    bank_init_batch_size: int = 64
    kmeans_iters: int = 20
    # optimisation
    steps: int = 1000
    slides_per_batch: int = 16               # global batch, split over ranks
    fresh_per_slide: int = 128               # tiles encoded with gradient per slide and step
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    amp: str = "auto"                        # auto (bf16 on GPU, off on CPU), bf16, fp16, off
    # run
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 1
    ckpt_every: int = 100
    max_steps_this_run: int | None = None    # stop (as if killed after a checkpoint) after this many steps
    progress: bool = True

    def validate(self) -> TrainConfig:
        for name in ("tile_dir", "reports", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required (in the config file or as --{name.replace('_', '-')})")
        if not Path(self.tile_dir).is_dir():
            raise FileNotFoundError(f"tile_dir: {self.tile_dir} is not a directory")
        if not Path(self.reports).is_file():
            raise FileNotFoundError(f"reports: {self.reports} does not exist")
        if self.assignment not in ("soft", "hard"):
            raise ValueError(f"assignment: expected 'soft' or 'hard'; got {self.assignment!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp: expected auto, bf16, fp16 or off; got {self.amp!r}")
        if self.bank_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"bank_dtype: expected auto, float32, float16 or bfloat16; got {self.bank_dtype!r}")
        for name in ("image_size", "num_codewords", "steps", "slides_per_batch", "fresh_per_slide", "heads",
                     "bank_init_batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1; got {getattr(self, name)}")
        for name in ("layers", "warmup_steps", "kmeans_iters", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0; got {getattr(self, name)}")
        if not 0.0 <= self.bank_momentum <= 1.0:
            raise ValueError(f"bank_momentum: expected a value in [0, 1]; got {self.bank_momentum}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0; got {self.lr}")
        if self.bank_rows_per_slide is not None and self.bank_rows_per_slide < 0:
            raise ValueError(f"bank_rows_per_slide: expected >= 0 or None; got {self.bank_rows_per_slide}")
        if self.max_steps_this_run is not None and self.max_steps_this_run < 1:
            raise ValueError(f"max_steps_this_run: expected >= 1; got {self.max_steps_this_run}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name):
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(name, value):
    """A config file value -> the field's type, or a ValueError naming the key."""
    want = _base_type(name)
    optional = type(None) in typing.get_args(_HINTS[name])
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: must not be null")
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true or false; got {value!r}")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer; got {value!r}")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number; got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string; got {value!r}")
    return value


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CONFIG: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    toml = path.suffix.lower() == ".toml"
    if toml and tomllib is None:
        raise ValueError(f"CONFIG: {path} is TOML, which this Python ({sys.version.split()[0]}) reads only with the "
                         f"tomli package: pip install tomli (or give the config as JSON)")
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (json.JSONDecodeError, *((tomllib.TOMLDecodeError,) if tomllib else ())) as e:
        raise ValueError(f"CONFIG: {path} is not valid {'TOML' if toml else 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"CONFIG: {path} must hold a table of options")
    data = dict(data.get("train", data))  # either flat, or under [train]
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"CONFIG: unknown option(s) {unknown} in {path}; known: {sorted(_FIELDS)}")
    base = path.parent
    out = {k: _coerce(k, v) for k, v in data.items()}
    for key in ("tile_dir", "reports", "out_dir", "slide_dir", "weights"):  # relative paths: to the config file
        if out.get(key) and not Path(out[key]).is_absolute():
            out[key] = str(base / out[key])
    return out


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _optional(cast):
    def parse(text):
        return None if text.strip().lower() in ("none", "null", "") else cast(text)
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (default None = not given, so the file and defaults apply)."""
    group = parser.add_argument_group("options (each overrides the config file)")
    defaults = TrainConfig()
    for name in _FIELDS:
        want = _base_type(name)
        optional = type(None) in typing.get_args(_HINTS[name])
        cast = _parse_bool if want is bool else want
        if optional:
            cast = _optional(cast)
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", type=cast, default=None,
                           metavar=want.__name__.upper(), help=f"(default {getattr(defaults, name)!r})")


def config_from_args(args) -> TrainConfig:
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in _FIELDS:
        v = getattr(args, f"cfg_{name}", None)
        if v is not None:
            values[name] = v
    return TrainConfig(**values).validate()


def field_names() -> list[str]:
    return list(_FIELDS)


__all__ = ["TrainConfig", "add_config_flags", "config_from_args", "load_config_file", "field"]
