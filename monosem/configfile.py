"""Config files: TOML recipes in, `--section.key=value` overrides, validation that names the field, the
resolved config out (TOML), and the field reference (`--help`, the README's tables).

    from monosem.configfile import load_config, to_toml
    cfg = load_config("configs/tiny.toml", ["--sae.l1_coeff=3e-4"])
    print(to_toml(cfg))
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import tomllib
import typing
from pathlib import Path

from monosem import config as schema
from monosem.config import Config, ConfigError


# value rules by sign (choices come from the Literal[...] types: choices() below)
POSITIVE = {"data.ctx_len", "data.contexts_per_shard", "data.shuffle_window", "data.num_threads", "lm.n_layer", "lm.d_model",
            "lm.n_head", "lm.d_mlp", "lm.vocab_size", "train_lm.steps", "train_lm.batch_size",
            "train_lm.lr", "train_lm.eval_batches", "train_lm.log_every", "train_lm.ckpt_every",
            "train_lm.keep_last", "buffer.producer_batch", "buffer.slot_vectors", "buffer.n_slots",
            "buffer.pool_size", "buffer.producer_threads", "buffer.timeout_s", "sae.d_in",
            "sae.n_features", "sae.k", "train_sae.steps", "train_sae.batch_size", "train_sae.lr",
            "train_sae.dead_window", "train_sae.resample_pool", "train_sae.log_every",
            "train_sae.ckpt_every", "train_sae.keep_last", "train_sae.eval_contexts", "dist.timeout_s",
            "analyze.batch_contexts", "analyze.top_k", "analyze.n_intervals",
            "analyze.interval_samples", "analyze.single_token_frac"}
NON_NEGATIVE = {"data.max_tokens", "stream.num_workers", "lm.dropout",
                "train_lm.warmup_steps", "train_lm.weight_decay", "train_lm.grad_clip",
                "train_lm.min_lr", "buffer.tokens_per_context", "buffer.spare_fraction",
                "buffer.producer_wait_threads", "sae.l1_coeff", "sae.aux_k",
                "sae.aux_coeff", "train_sae.warmup_steps", "train_sae.l1_warmup_steps",
                "train_sae.grad_clip", "train_sae.eval_every", "train_sae.resample_power",
                "analyze.tokens", "analyze.skip_positions", "analyze.window_before", "analyze.window_after", "analyze.ultralow_density"}


def _coerce(key: str, value: object, typ: object) -> object:
    """Check/convert one value to its field type; raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:  # parsed as its values' type; validate() checks the value
        return _coerce(key, value, type(typing.get_args(typ)[0]))
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if isinstance(value, str) and typ is not str:
        value = _parse_scalar(key, value, typ)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def _parse_scalar(key: str, text: str, typ: object) -> object:
    t = text.strip()
    if typ is bool:
        if t.lower() in ("true", "1", "yes", "on"):
            return True
        if t.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {text!r}")
    try:
        return int(t.replace("_", "")) if typ is int else float(t)
    except ValueError:
        if typ is int:
            try:
                f = float(t)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected {'an integer' if typ is int else 'a number'}, "
                          f"got {text!r}") from None


def _section_types(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _set(cfg: Config, key: str, value: object) -> None:
    section, _, name = key.partition(".")
    if not name or section not in _section_types(Config):
        known = ", ".join(_section_types(Config))
        raise ConfigError(f"unknown config section in {key!r} (sections: {known})")
    sec = getattr(cfg, section)
    types = _section_types(type(sec))
    if name not in types:
        raise ConfigError(f"unknown config key {key!r} (keys of [{section}]: {', '.join(types)})")
    setattr(sec, name, _coerce(key, value, types[name]))


def choices() -> dict[str, tuple]:
    """{"section.key": allowed values} of every field typed Literal[...] in monosem.config."""
    out = {}
    for section, cls in _section_types(Config).items():
        for name, typ in _section_types(cls).items():
            if typing.get_origin(typ) is typing.Literal:
                out[f"{section}.{name}"] = typing.get_args(typ)
    return out


def validate(cfg: Config) -> Config:
    """Check value ranges, choices and every cross-field rule; raise ConfigError naming the key(s) and
    value(s). The trainers, the buffer and the CLI all go through here."""
    for key in POSITIVE | NON_NEGATIVE:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if key in POSITIVE and not v > 0:
            raise ConfigError(f"{key} must be > 0, got {v!r}")
        if key in NON_NEGATIVE and v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v!r}")
    for key, allowed in choices().items():
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v not in allowed or type(v) is not type(allowed[0]):  # True == 1: a bool is not stage 1
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {v!r}")
    _check_model_and_run(cfg)
    _check_buffer(cfg)
    return cfg


def _check_model_and_run(cfg: Config) -> None:
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction!r}")
    if cfg.lm.d_model % cfg.lm.n_head:
        raise ConfigError(f"lm.d_model ({cfg.lm.d_model}) must be divisible by lm.n_head "
                          f"({cfg.lm.n_head})")
    if cfg.lm.vocab_size < 50257:
        raise ConfigError(f"lm.vocab_size must be >= 50257 (GPT-2 ids), got {cfg.lm.vocab_size}")
    if cfg.sae.recipe == "topk" and cfg.sae.k > cfg.sae.n_features:
        raise ConfigError(f"sae.k ({cfg.sae.k}) exceeds sae.n_features ({cfg.sae.n_features})")
    if cfg.train_sae.threads < 0:
        raise ConfigError(f"train_sae.threads must be >= 0 (0 = every core), got {cfg.train_sae.threads}")
    if not 0 <= cfg.buffer.producer_nice <= 19:
        raise ConfigError(f"buffer.producer_nice must be in 0..19, got {cfg.buffer.producer_nice}")
    if not 0.0 <= cfg.train_sae.sparse_threshold <= 1.0:
        raise ConfigError(f"train_sae.sparse_threshold must be in [0, 1], got {cfg.train_sae.sparse_threshold}")
    if not 0.0 < cfg.train_sae.decay_start <= 1.0:
        raise ConfigError(f"train_sae.decay_start must be in (0, 1], got {cfg.train_sae.decay_start}")
    for key, name in (("run.name", cfg.run.name), ("train_sae.out", cfg.train_sae.out)):
        if name in ("", ".", "..") or "/" in name or name in ("data", "lm"):
            raise ConfigError(f"{key} must be a plain folder name (not data or lm), got {name!r}")


def _check_buffer(cfg: Config) -> None:
    """The activation buffer's rules: a slot holds whole contexts, the pool holds a batch plus a slot."""
    b = cfg.buffer
    if b.tokens_per_context > cfg.data.ctx_len:
        raise ConfigError(f"buffer.tokens_per_context ({b.tokens_per_context}) exceeds "
                          f"data.ctx_len ({cfg.data.ctx_len})")
    per_context = b.tokens_per_context or cfg.data.ctx_len
    if per_context > b.slot_vectors:
        raise ConfigError(f"buffer.slot_vectors ({b.slot_vectors}) must hold one context's "
                          f"{per_context} vectors (buffer.tokens_per_context or data.ctx_len)")
    if b.pool_size < 2 * b.slot_vectors:
        raise ConfigError(f"buffer.pool_size ({b.pool_size}) must be >= 2 x buffer.slot_vectors "
                          f"({b.slot_vectors})")
    if cfg.train_sae.batch_size > b.pool_size - b.slot_vectors:
        raise ConfigError(f"train_sae.batch_size ({cfg.train_sae.batch_size}) must be <= "
                          f"buffer.pool_size - buffer.slot_vectors ({b.pool_size} - {b.slot_vectors}): "
                          f"the pool tops up while it has room for a slot, then draws a batch")


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from a nested dict (as read from TOML); unknown keys are errors."""
    cfg = Config()
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: top-level key {section!r} must be a [section] table")
        for name, value in values.items():
            try:
                _set(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` strings (the leading dashes are optional)."""
    for item in overrides:
        text = item.lstrip("-")
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        key, value = text.split("=", 1)
        _set(cfg, key.strip(), value)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML recipe (or the defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    cfg = from_dict(data, source=str(path) if path else "config")
    return validate(apply_overrides(cfg, overrides or []))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (round-trips through load_config)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _type_name(annotation: ast.expr) -> str:
    """`Literal["a", "b"]` reads as `str` (the docstring lists the choices), anything else as written."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Literal":
        values = ast.literal_eval(annotation.slice)
        return type(values[0] if isinstance(values, tuple) else values).__name__
    return ast.unparse(annotation)


def field_docs() -> dict[str, tuple[str, str, object]]:
    """{"section.key": (type name, docstring, default)} read from monosem/config.py's source."""
    tree = ast.parse(inspect.getsource(schema))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out, defaults = {}, to_dict(Config())
    for section, cls in _section_types(Config).items():
        body = classes[cls.__name__].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    doc = " ".join(str(nxt.value.value).split())
                name = node.target.id
                out[f"{section}.{name}"] = (_type_name(node.annotation), doc,
                                            defaults[section][name])
    return out


def help_text(sections: list[str] | None = None) -> str:
    """The config reference: one line per field, grouped by section."""
    lines, current = [], None
    for key, (typ, doc, default) in field_docs().items():
        section = key.split(".")[0]
        if sections and section not in sections:
            continue
        if section != current:
            lines.append(f"\n[{section}]")
            current = section
        lines.append(f"  --{key}={_toml_value(default)}  ({typ})\n      {doc}")
    return "\n".join(lines)


def save_config(cfg: Config, folder: str | Path) -> Path:
    """Write the resolved config as `<folder>/config.toml` (atomically); return its path."""
    from monosem.files import write_text_atomic

    path = Path(folder) / "config.toml"
    write_text_atomic(path, to_toml(cfg))
    return path


def markdown_reference() -> str:
    """The config reference as Markdown tables (the README's section is generated with this:
    `python -c "from monosem.configfile import markdown_reference as m; print(m())"`)."""
    out, current = [], None
    for key, (typ, doc, default) in field_docs().items():
        section = key.split(".")[0]
        if section != current:
            out += ["", f"**[{section}]**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            current = section
        out.append(f"| `{key}` | {typ} | `{_toml_value(default)}` | {doc.replace('|', '/')} |")
    return "\n".join(out[1:])
