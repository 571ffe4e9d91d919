"""``atdiff train``: the command line of the training loop. It sits above ``atdiff.training`` and
``atdiff.eval``: it hands the loop the FID evaluator, so training never imports eval."""

from __future__ import annotations

import argparse
import json
import shlex

import yaml

from .config import load_config
from .errors import UsageError
from .latents import MissingLatents
from .training.loop import TrainingDiverged, train

EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C'd command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("--output-dir", help="run folder (training.output_dir; default outputs/<config name>)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (training.max_steps)")
    parser.add_argument("--batch-size", type=int, help="images per optimizer step over all processes (training.batch_size)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (training.checkpoint_every)")
    parser.add_argument("--seed", type=int, help="training.seed")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint of the output dir, or from a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any config key, e.g. training.learning_rate=3e-4 model.token_mixer=attention")


FLAG_KEYS = {
    "output_dir": "training.output_dir",
    "max_steps": "training.max_steps",
    "batch_size": "training.batch_size",
    "checkpoint_every": "training.checkpoint_every",
    "seed": "training.seed",
}


def run(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    check_no_conflicts(flags, args.overrides)
    cfg = load_config(args.config, [*args.overrides, *(f"{key}={json.dumps(value)}" for key, value in flags.items())])
    try:
        result = train(cfg, resume=args.resume, evaluator=training_evaluator(cfg))
    except MissingLatents as err:
        raise MissingLatents(err.problem, shlex.join(["atdiff", "encode", "--config", args.config, *args.overrides])) from None
    except TrainingDiverged as err:
        print(f"atdiff train: error: {err}", flush=True)
        return 1
    return EXIT_INTERRUPTED if result.interrupted else 0


def training_evaluator(cfg):
    """FID/KID during training when the config asks for it (imported only then: torch-fidelity)."""
    if not cfg.training.eval_every:
        return None
    from .eval.training_eval import TrainingEvaluator

    return TrainingEvaluator


def check_no_conflicts(flags: dict[str, object], overrides: list[str]) -> None:
    """A flag and a KEY=VALUE for the same key must agree: neither silently wins."""
    for override in overrides:
        key, _, text = override.partition("=")
        if key.strip() in flags:
            flag = "--" + next(name for name, k in FLAG_KEYS.items() if k == key.strip()).replace("_", "-")
            try:
                same = yaml.safe_load(text) == flags[key.strip()]
            except yaml.YAMLError:
                same = False
            if not same:
                raise UsageError(f"{flag} {flags[key.strip()]} and {override} both set {key.strip()}; give it once")
