"""Chaos per stage (tests/chaos.py): SIGKILLs of random processes of a stage at random moments (the
driver, a pool worker, its guard, the resource tracker, a DataLoader worker), then nothing of the
killed run left, and the same command's outputs those of an uninterrupted run, byte for byte (the
training stages: exported weights and every logged loss). One round of up to three kills per stage
here, seeded: the kill schedule is printed, and a failure is hunted further with
``python benchmarks/chaos.py --stage S --rounds N --seed K``."""

from __future__ import annotations

import pytest

from .chaos import chaos, stage

# the fixtures each stage's inputs come from (tests/conftest.py), by the name tests/chaos.py gives them
NEEDS = {"encode": {"vae": "vae_path"}, "caption": {"data": "data", "biart": "biart"},
         "generate": {"data": "data", "biart": "biart"}, "download": {"server": "server"}, "train": {"data": "data"},
         "train-vae": {"data": "data"}}
# Workers of the model stages: one (each loads the models, seconds of a busy CPU); two elsewhere.
WORKERS = {"caption": 1, "generate": 1}
SEED = 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEEDS))
def test_a_stage_killed_at_random_leaves_nothing_and_finishes_with_the_same_outputs(name, tmp_path, request):
    files = {key: request.getfixturevalue(fixture) for key, fixture in NEEDS[name].items()}
    result = chaos(stage(name, str(tmp_path / "inputs"), files, WORKERS.get(name, 2)), str(tmp_path), rounds=1,
                   seed=SEED)
    assert result.kills >= 1
    assert result.orphans == []
    assert result.temporaries == []
    assert result.differences == []
