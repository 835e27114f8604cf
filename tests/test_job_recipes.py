"""The job keys of the training recipes: every shipped job file is valid,
the recipes' settings reach the optimiser and the readers, and bad
combinations are named."""
from pathlib import Path

import pytest

from hpcnn.job import Job, JobError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_job_files_are_valid(path):
    Job.load(path)


def test_the_lars_recipe_says_what_the_issue_asks():
    j = Job.load(ROOT / "jobs" / "imagenet_resnet50_lars.toml")
    assert j["model"]["name"] == "resnet50" and j["optimizer"]["kind"] == "lars"
    assert j["schedule"]["warmup_epochs"] > 0 and j["train"]["label_smoothing"] > 0
    assert j["augment"]["random_resized_crop"] and j["augment"]["flip"] and j["augment"]["resize"] == 256
    assert j["optimizer"]["exclude_bias_and_norm"]


def test_the_digits_job_augments():
    j = Job.load(ROOT / "jobs" / "digits.toml")
    assert j["augment"]["random_resized_crop"] and j["augment"]["mean"] and j["augment"]["std"]


def _job(**sections):
    raw = {"model": {"name": "digits_cnn"}, "data": {"path": "x.h5"}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return Job(raw)


@pytest.mark.parametrize("sections,match", [
    (dict(train={"batch": 64, "accumulate": 3}), "train.batch = 64 is not divisible by train.accumulate = 3"),
    (dict(optimizer={"kind": "adamw", "nesterov": True}), "applies to optimizer.kind = \"sgd\" only"),
    (dict(optimizer={"kind": "lars", "weight_decay_mode": "decoupled"}), "inside the trust ratio"),
    (dict(optimizer={"kind": "adam"}), r"optimizer.kind = 'adam' is not allowed \(expected one of sgd, adamw"),
    (dict(optimizer={"betas": [0.9, 1.0]}), r"optimizer.betas .* two numbers in \[0, 1\)"),
    (dict(train={"label_smoothing": 1.0}), r"train.label_smoothing = 1.0 is not allowed \(expected a number in \[0, 1\)"),
    (dict(augment={"crop_scale": [0.5, 1.5]}), r"augment.crop_scale .* 0 < low <= high <= 1"),
    (dict(augment={"std": [0.0]}), r"augment.std .* positive numbers"),
    (dict(augment={"resize": -1}), "augment.resize = -1 is not allowed"),
])
def test_bad_recipe_settings_name_the_key(sections, match):
    with pytest.raises(JobError, match=match):
        _job(**sections)
