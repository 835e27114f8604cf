"""Job files: TOML that names the model, data, batch, epochs, optimiser,
augmentation, schedule, plan, checkpoints and seed of a training run.

Every key has a type and a default; unknown keys and bad values are errors
that name the key (``train.epochs``) and the value.  ``--set key=value``
overrides a key from the command line (the value is parsed as TOML, falling
back to a plain string).
"""
from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class JobError(ValueError):
    """A bad job file or override; the message names the key."""


@dataclass(frozen=True)
class Key:
    type: Any                    # python type or tuple of types
    default: Any
    check: Callable | None = None
    help: str = ""


def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


def _trials(v):
    """a non-negative integer or 'auto'"""
    return v == "auto" or (isinstance(v, int) and v >= 0)


def _number_pair(lo, hi, what):
    def f(v):
        return (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                and lo < v[0] <= v[1] <= hi)
    f.__doc__ = what
    return f


def _betas(v):
    """two numbers in [0, 1)"""
    return (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and all(0 <= x < 1 for x in v))


def _numbers(v):
    """a list of numbers, one per channel (or empty)"""
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _positive_numbers(v):
    """a list of positive numbers, one per channel (or empty)"""
    return _numbers(v) and all(x > 0 for x in v)


def _smoothing(v):
    """a number in [0, 1)"""
    return 0 <= v < 1


def _one_of(*choices):
    def f(v):
        return v in choices
    f.__doc__ = "one of " + ", ".join(map(str, choices))
    return f


# section -> key -> Key
SCHEMA: dict[str, dict[str, Key]] = {
    "job": {
        "name": Key(str, "job", help="name used in logs and file names"),
        "seed": Key(int, 0, _nonneg, "seed of initialisation, shuffling and dropout"),
        "dtype": Key(str, "float32", _one_of("float32", "float64")),
    },
    "model": {
        "name": Key(str, "", help="a model from `hpcnn models` (or give model.onnx or model.builder)"),
        "onnx": Key(str, "", help="an ONNX file (exported from PyTorch, say) to train instead of a zoo model"),
        "onnx_init": Key(str, "weights", _one_of("weights", "random"),
                         "start an ONNX model from its weights or from hpcnn's seeded initialisation"),
        "builder": Key(str, "", help="package.module:function that builds the network (docs/user-guide.md)"),
        "image_size": Key(int, 0, _nonneg, "input height/width; 0 = the data's"),
        "num_classes": Key(int, 0, _nonneg, "0 = the data's"),
    },
    "data": {
        "path": Key(str, None, help="HDF5 file (hpcnn data digits/convert/synth)"),
        "train": Key(str, "train", help="group holding the training images/labels"),
        "test": Key(str, "test", help="group for evaluation ('' = none)"),
        "prefetch": Key(int, 2, _nonneg, "batches read ahead in a background thread"),
        "limit": Key(int, 0, _nonneg, "use only the first N training samples (0 = all)"),
    },
    "train": {
        "batch": Key(int, 64, _pos, "GLOBAL batch size (split over the ranks by the plan)"),
        "epochs": Key(int, 1, _pos, "passes over the training data"),
        "max_steps": Key(int, 0, _nonneg, "stop after this many steps (0 = no limit)"),
        "eval_every": Key(int, 1, _nonneg, "evaluate every N epochs (0 = only at the end)"),
        "log_every": Key(int, 10, _pos, "steps between metric lines"),
        "accumulate": Key(int, 1, _pos, "micro-batches per optimiser step: train.batch is split into this many, "
                          "each run forward and backward, gradients averaged (batch norm sees each "
                          "micro-batch; the plan is for the micro-batch)"),
        "label_smoothing": Key((int, float), 0.0, _smoothing, "label smoothing of the cross-entropy "
                               "(target (1 - eps) onehot + eps / classes)"),
    },
    "optimizer": {
        "kind": Key(str, "sgd", _one_of("sgd", "adamw", "lars", "lamb"), "the optimiser"),
        "lr": Key((int, float), 0.1, _pos, "peak learning rate"),
        "momentum": Key((int, float), 0.9, lambda v: 0 <= v < 1, "momentum of sgd and lars, in [0, 1)"),
        "nesterov": Key(bool, False, help="Nesterov momentum (sgd; needs momentum > 0)"),
        "weight_decay": Key((int, float), 0.0, _nonneg, "weight decay (how it is applied: weight_decay_mode)"),
        "weight_decay_mode": Key(str, "auto", _one_of("auto", "l2", "decoupled"),
                                 "auto: the kind's own (sgd l2, adamw and lamb decoupled, lars inside the "
                                 "trust ratio); l2: added to the gradient; decoupled: w -= lr * wd * w"),
        "betas": Key(list, [0.9, 0.999], _betas, "adamw and lamb: decay rates of the moments"),
        "eps": Key((int, float), 0, _nonneg, "adamw and lamb: added to the root of the second moment "
                   "(0 = the kind's default: 1e-8 adamw, 1e-6 lamb)"),
        "trust_coefficient": Key((int, float), 0.001, _pos, "lars: eta of the trust ratio "
                                 "eta ||w|| / (||g|| + wd ||w||)"),
        "exclude_bias_and_norm": Key(bool, False, help="no weight decay and (lars, lamb) no layer-wise "
                                     "adaptation for 1-D parameters: biases, batch-norm scale and shift"),
        "clip_norm": Key((int, float), 0.0, _nonneg, "clip gradients to this global norm (over every "
                         "parameter of the network; 0 = no clipping)"),
    },
    "schedule": {
        "kind": Key(str, "cosine", _one_of("constant", "step", "cosine")),
        "warmup_epochs": Key((int, float), 0, _nonneg, "linear warm-up from lr/steps to lr"),
        "milestones": Key(list, [], help="epochs at which a step schedule multiplies lr by gamma"),
        "gamma": Key((int, float), 0.1, _pos, "factor of a step schedule at each milestone"),
    },
    "augment": {
        "random_resized_crop": Key(bool, False, help="training: a random crop (area fraction crop_scale, "
                                   "aspect ratio crop_ratio) resized to model.image_size"),
        "crop_scale": Key(list, [0.08, 1.0], _number_pair(0, 1, "two numbers 0 < low <= high <= 1"),
                          "range of the crop's area as a fraction of the image's"),
        "crop_ratio": Key(list, [0.75, 1.3333333333333333], _number_pair(0, float("inf"),
                          "two numbers 0 < low <= high"), "range of the crop's aspect ratio (width / height)"),
        "flip": Key(bool, False, help="training: flip left to right with probability 1/2"),
        "resize": Key(int, 0, _nonneg, "evaluation (and training without random_resized_crop): resize the "
                      "shorter side to this, then centre crop to model.image_size (0 = no resize)"),
        "mean": Key(list, [], _numbers, "per-channel mean subtracted, in stored units (0..255 for uint8); "
                    "[] = the data file's"),
        "std": Key(list, [], _positive_numbers, "per-channel standard deviation divided by, in stored "
                   "units; [] = the data file's"),
    },
    "plan": {
        "mode": Key(str, "search", help="search | data-parallel | a plan JSON file"),
        "machine": Key(str, "local", help="machine description for the search (name or file)"),
        "memory_gib": Key((int, float), 0, _nonneg, "per-rank memory limit: the search fits its plan under it; "
                          "a data-parallel or given plan above it is an error (0 = none)"),
        "save": Key(str, "", help="write the plan used to this file"),
        "trials": Key((int, str), "auto", _trials,
                      "after a search, time this many candidate plans (the searched one, the baselines, "
                      "data parallelism always) for a few steps and train with the fastest; \"auto\": 3 "
                      "when a baseline is predicted within plan.trial_tolerance of the searched plan, "
                      "else none; 0: never"),
        "trial_steps": Key(int, 3, _pos, "timed steps per trial (after one warm-up step)"),
        "trial_rounds": Key(int, 3, _pos, "rounds of trials at most: after the first, the candidates whose "
                            "steps overlap with the fastest's are timed again, in turns"),
        "trial_tolerance": Key((int, float), 0.25, _nonneg,
                               "relative error of the cost model within which \"auto\" trials run"),
        "trial_margin": Key((int, float), 0.05, _nonneg,
                            "a trialled plan replaces the searched one only when measured faster by more "
                            "than this fraction"),
    },
    "checkpoint": {
        "dir": Key(str, "", help="directory for checkpoints ('' = no checkpoints)"),
        "every_steps": Key(int, 0, _nonneg, "checkpoint every N steps (0 = only at epoch ends)"),
        "keep": Key(int, 3, _pos, "number of checkpoints kept"),
        "resume": Key(bool, True, help="resume from the newest checkpoint in dir"),
    },
    "log": {
        "metrics": Key(str, "", help="JSON-lines metrics file ('' = none)"),
        "trace": Key(str, "", help="Chrome trace file, one per rank ('' = none)"),
        "progress": Key(str, "auto", _one_of("auto", "bar", "lines", "off")),
        "stall_seconds": Key((int, float), 300, _pos, "report ranks that have not finished a step (or reached "
                             "the phase of the run another rank is in) after this many seconds"),
        "stall_end_seconds": Key((int, float), 1800, _nonneg, "end the job (exit status 4) when no progress (a "
                                 "step, an evaluation batch, a new phase) was made for this many seconds "
                                 "(0 = never)"),
        "heartbeat_timeout": Key((int, float), 30, _pos, "end the job (exit status 4) when a rank or rank 0 "
                                 "has not been heard for this many seconds (a lost node)"),
    },
}

REQUIRED = [("data", "path")]


def _type_name(t):
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def _check(section, key, value):
    spec = SCHEMA[section][key]
    t = spec.type
    ok_type = isinstance(value, t) and not (isinstance(value, bool) and t is not bool and bool not in (t if isinstance(t, tuple) else (t,)))
    if not ok_type:
        raise JobError(f"{section}.{key} must be {_type_name(t)}, got {value!r}")
    if spec.check is not None and not spec.check(value):
        what = spec.check.__doc__ or "a valid value"
        raise JobError(f"{section}.{key} = {value!r} is not allowed (expected {what})")


class Job:
    """A validated job: ``job['train']['batch']`` or ``job.get('train.batch')``."""

    def __init__(self, data: dict, source: str = "<job>"):
        self.source = source
        self.data = self._validate(data)

    @staticmethod
    def _validate(raw: dict) -> dict:
        out = {s: {k: copy.deepcopy(v.default) for k, v in keys.items()} for s, keys in SCHEMA.items()}
        for section, body in raw.items():
            if section not in SCHEMA:
                raise JobError(f"unknown section [{section}]; sections are {', '.join(SCHEMA)}")
            if not isinstance(body, dict):
                raise JobError(f"[{section}] must be a table of keys, got {body!r}")
            for key, value in body.items():
                if key not in SCHEMA[section]:
                    raise JobError(f"unknown key {section}.{key}; [{section}] takes "
                                   f"{', '.join(SCHEMA[section])}")
                _check(section, key, value)
                out[section][key] = value
        for section, key in REQUIRED:
            if out[section][key] in (None, ""):
                raise JobError(f"{section}.{key} is required")
        given = [k for k in ("name", "onnx", "builder") if out["model"][k]]
        if len(given) != 1:
            raise JobError(f"[model] must name exactly one of model.name (a zoo model), model.onnx (a file) "
                           f"and model.builder (package.module:function), got {given or 'none'}")
        opt = out["optimizer"]
        if opt["nesterov"] and not opt["momentum"]:
            raise JobError("optimizer.nesterov = true needs optimizer.momentum > 0 "
                           f"(it is {opt['momentum']})")
        if opt["nesterov"] and opt["kind"] != "sgd":
            raise JobError(f"optimizer.nesterov = true applies to optimizer.kind = \"sgd\" only, not "
                           f"{opt['kind']!r}: set it to false")
        if opt["kind"] == "lars" and opt["weight_decay_mode"] == "decoupled":
            raise JobError("optimizer.kind = \"lars\" puts the weight decay inside the trust ratio: set "
                           "optimizer.weight_decay_mode to \"auto\" or \"l2\" (or use lamb or adamw)")
        tr = out["train"]
        if tr["batch"] % tr["accumulate"]:
            raise JobError(f"train.batch = {tr['batch']} is not divisible by train.accumulate = "
                           f"{tr['accumulate']}: every micro-batch must have the same size")
        return out

    @classmethod
    def load(cls, path, overrides=()) -> "Job":
        p = Path(path)
        if not p.is_file():
            raise JobError(f"job file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise JobError(f"job file {str(p)!r} is not valid TOML: {exc}") from None
        for ov in overrides:
            apply_override(raw, ov)
        job = cls(raw, str(p))
        job.base_dir = p.resolve().parent
        return job

    def __getitem__(self, section) -> dict:
        return self.data[section]

    def get(self, dotted: str):
        s, k = dotted.split(".", 1)
        return self.data[s][k]

    def to_json(self) -> str:
        return json.dumps(self.data, sort_keys=True)

    def resolve(self, path: str) -> Path:
        """A path from the job file, relative to the current directory (as
        users expect from the command line) unless absolute."""
        return Path(path).expanduser()


def apply_override(raw: dict, text: str) -> None:
    """Apply ``section.key=value`` to a raw job dict (value parsed as TOML)."""
    if "=" not in text:
        raise JobError(f"--set {text!r}: expected section.key=value")
    dotted, value = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise JobError(f"--set {text!r}: the key must be section.key, e.g. train.epochs=3")
    section, key = dotted.split(".")
    if section not in SCHEMA:
        raise JobError(f"--set {dotted}: unknown section [{section}]; sections are {', '.join(SCHEMA)}")
    if key not in SCHEMA[section]:
        raise JobError(f"--set {dotted}: unknown key; [{section}] takes {', '.join(SCHEMA[section])}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    raw.setdefault(section, {})[key] = parsed
