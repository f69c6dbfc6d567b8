"""`monosem <verb> [CONFIG.toml] [--section.key=value ...]`: the command line.

    monosem prepare configs/quickstart.toml          # corpus -> token shards + manifest
    monosem train-lm configs/quickstart.toml         # shards -> frozen 1-layer LM
    monosem train-sae configs/quickstart.toml        # LM activations (streamed) -> SAE
    monosem quickstart                               # all of the above, sized for 2 CPU cores
    monosem config configs/paper.toml --sae.l1_coeff=3e-4   # print the resolved config
    monosem train-sae --help                         # every config field with its docs
"""
from __future__ import annotations

import sys
from typing import Callable

from monosem.config import Config, ConfigError
from monosem.configfile import help_text, load_config, to_toml
from monosem.errors import MonosemError

USAGE = """usage: monosem VERB [CONFIG.toml] [--section.key=value ...] [--resume]

verbs:
  prepare     tokenize the corpus into WebDataset token shards + manifest.json
  train-lm    train the frozen 1-layer LM on the shards
  train-sae   train sparse autoencoder(s) on streamed MLP activations
  quickstart  prepare + train-lm + train-sae on the embedded corpus (configs/quickstart.toml)
  analyze     read the SAE's features on held-out text -> static HTML feature browser
  export      write the SAE in the SAELens layout (cfg.json + sae_weights.safetensors)
  config      print the resolved config as TOML
  bench       every benchmark, one after the other -> one JSON + one table (--quick, --out, --readme)

`monosem VERB --help` lists every config field with its documentation."""

VERB_SECTIONS = {
    "prepare": ["run", "data"],
    "train-lm": ["run", "data", "stream", "lm", "train_lm", "dist"],
    "train-sae": ["run", "data", "stream", "buffer", "sae", "sweep", "train_sae", "dist"],
    "quickstart": None,
    "config": None,
    "analyze": ["run", "data", "stream", "train_sae", "analyze"],
    "export": ["run", "train_sae", "export"],
    "bench": None,  # its own flags: monosem.bench
}


def _prepare(cfg: Config, resume: bool) -> None:
    from monosem.prepare import prepare

    prepare(cfg)


def _train_lm(cfg: Config, resume: bool) -> None:
    from monosem.train_lm import train_lm

    train_lm(cfg, resume=resume)


def _train_sae(cfg: Config, resume: bool) -> None:
    from monosem.train_sae import train

    train(cfg, resume=resume)


def _quickstart(cfg: Config, resume: bool) -> None:
    from monosem.quickstart import quickstart

    quickstart(cfg, resume=resume)


def _analyze(cfg: Config, resume: bool) -> None:
    from monosem.analyze import analyze

    analyze(cfg)


def _export(cfg: Config, resume: bool) -> None:
    from monosem.export import export

    export(cfg)


def _config(cfg: Config, resume: bool) -> None:
    print(to_toml(cfg))


VERBS: dict[str, Callable[[Config, bool], None]] = {
    "prepare": _prepare, "train-lm": _train_lm, "train-sae": _train_sae,
    "quickstart": _quickstart, "config": _config, "analyze": _analyze, "export": _export,
}


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str], bool, bool]:
    """-> (verb, config path, overrides, resume, help)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return "help", None, [], False, True
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise ConfigError(f"unknown verb {verb!r}; one of: {', '.join(VERBS)}")
    path, overrides, resume, want_help = None, [], False, False
    for arg in rest:
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--resume":
            resume = True
        elif arg.startswith("--"):
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r} (one config file, then --section.key=value)")
    if verb == "quickstart" and path is None:
        path = default_config("quickstart")
    return verb, path, overrides, resume, want_help


def default_config(name: str) -> str:
    """Path of a recipe shipped in configs/ (next to the package in a source checkout)."""
    from pathlib import Path

    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        p = base / "configs" / f"{name}.toml"
        if p.is_file():
            return str(p)
    raise ConfigError(f"configs/{name}.toml not found (run from the monosem checkout or pass a config)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own flags (--quick, --out, --readme), not config overrides
        from monosem.bench import main as bench

        return bench(argv[1:])
    try:
        verb, path, overrides, resume, want_help = parse_args(argv)
        if verb == "help":
            print(USAGE)
            return 0
        if want_help:
            print(USAGE.splitlines()[0].replace("VERB", verb))
            print(help_text(VERB_SECTIONS[verb]))
            return 0
        cfg = load_config(path, overrides)
        VERBS[verb](cfg, resume)
    except ConfigError as e:
        print(f"monosem: config error: {e}", file=sys.stderr)
        return 2
    except MonosemError as e:
        print(f"monosem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monosem: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
