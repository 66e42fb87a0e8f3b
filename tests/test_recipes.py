"""Every shipped training recipe validates and states the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.config import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "appliance" / "train" / "recipes").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_names_its_command(recipe: Path) -> None:
    text = recipe.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"appliance train --run RUN --recipe appliance/train/recipes/{recipe.name}" in h for h in header)
    TrainConfig(store="/tmp/unused", **yaml.safe_load(text))


def test_config_reports_every_problem_at_once() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as excinfo:
        TrainConfig(store="/tmp/unused", rank=0, learning_rate=-1, method="bogus", batch_size=0)
    fields = {e["loc"][0] for e in excinfo.value.errors()}
    assert fields == {"rank", "learning_rate", "method", "batch_size"}
