"""The CLI's options and the TUI's forms are made from the stage configs: a field added to a config is an
option and a form field, with the same help and bounds, and a bad value gets the config's own message."""

from __future__ import annotations

import asyncio

import pytest
import typer
from conftest import run_cli
from pydantic import Field, ValidationError
from textual.app import App, ComposeResult
from textual.widgets import Checkbox, Input, Select
from typer.testing import CliRunner

from appliance.cli.options import Settings, config_options
from appliance.config import DataConfig, EvalConfig, ExportConfig, ImportConfig, ServeConfig, TrainConfig
from appliance.errors import ConfigError
from appliance.fields import fields, validated
from tui.widgets.form import ConfigForm


class WithAnExtraField(TrainConfig):
    warmup_steps: int = Field(default=0, ge=0, le=10_000, description="Steps of linear warmup before the schedule")


def _config_error(**values: object) -> str:
    """What the config itself says about these values."""
    with pytest.raises(ValidationError) as caught:
        WithAnExtraField.model_validate({"store": "/tmp/store", **values})
    return str(caught.value.errors()[0]["msg"])


def test_a_field_added_to_a_config_is_an_option_validated_as_the_config_validates() -> None:
    app = typer.Typer()

    @app.command()
    @config_options(WithAnExtraField, exclude=("store", "resume"))
    def train(settings: Settings) -> None:
        typer.echo(validated(WithAnExtraField, {**settings, "store": "/tmp/store"}).warmup_steps)

    runner = CliRunner()
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "240"}).output
    assert "--warmup-steps" in shown and "Steps of linear warmup before the schedule [0 to 10000; default 0]" in shown
    assert runner.invoke(app, ["--warmup-steps", "12"]).output.strip() == "12"
    refused = runner.invoke(app, ["--warmup-steps", "-1"])
    assert isinstance(refused.exception, ConfigError)
    assert refused.exception.message == f"--warmup-steps: {_config_error(warmup_steps=-1)}"
    refused = runner.invoke(app, ["--warmup-steps", "many"])
    assert isinstance(refused.exception, ConfigError)
    assert refused.exception.message == f"--warmup-steps: {_config_error(warmup_steps='many')}"


def test_a_field_added_to_a_config_is_a_form_field_validated_as_the_config_validates() -> None:
    class FormApp(App[None]):
        def compose(self) -> ComposeResult:
            yield ConfigForm(WithAnExtraField, exclude=("store", "resume"), id="form")

    async def drive() -> None:
        app = FormApp()
        async with app.run_test(size=(120, 80)) as pilot:
            form = app.query_one("#form", ConfigForm)
            box = app.query_one("#f-warmup_steps", Input)
            assert "Steps of linear warmup" in str(box.tooltip) and box.value == "0"
            box.value = "12"
            await pilot.pause()
            assert form.validate_with({"store": "/tmp/store"}).warmup_steps == 12
            box.value = "-1"
            await pilot.pause()
            with pytest.raises(ConfigError) as caught:
                form.validate_with({"store": "/tmp/store"})
            assert caught.value.message == f"warmup steps: {_config_error(warmup_steps=-1)}"

    asyncio.run(drive())


@pytest.mark.parametrize(("command", "config", "exclude"), [
    (["train"], TrainConfig, ("store", "resume")),
    (["data", "prepare"], DataConfig, ("store", "inputs")),
    (["export"], ExportConfig, ("store",)),
    (["eval"], EvalConfig, ("store",)),
    (["serve"], ServeConfig, ("store", "api_key", "constrain", "model")),
    (["models", "import"], ImportConfig, ("store", "source")),
])
def test_every_field_of_a_stage_is_an_option_of_its_command(command: list[str], config: type,
                                                              exclude: tuple[str, ...]) -> None:
    shown = run_cli(*command, "--help", env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).stdout
    missing = [spec.option for spec in fields(config, exclude) if spec.option not in shown]
    assert not missing, f"{' '.join(command)} lacks {missing}"


def test_the_train_form_offers_every_training_setting() -> None:
    from tui.screens.train import HIDDEN

    class FormApp(App[None]):
        def compose(self) -> ComposeResult:
            yield ConfigForm(TrainConfig, exclude=HIDDEN, id="form")

    async def drive() -> None:
        app = FormApp()
        async with app.run_test(size=(120, 80)):
            for spec in fields(TrainConfig, HIDDEN):
                widget = app.query_one(f"#f-{spec.name}")
                kind = {"bool": Checkbox, "choice": Select}.get(spec.kind, Input)
                assert isinstance(widget, kind), spec.name
            form = app.query_one("#form", ConfigForm)
            cfg = form.validate_with({"store": "/tmp/store"})
            assert cfg == TrainConfig(store="/tmp/store")  # the form starts from the config's own defaults
            app.query_one("#f-mix", Input).value = "run-a=0.5,run-b"
            app.query_one("#f-method", Select).value = "qlora"
            app.query_one("#f-target_modules", Input).value = "q_proj,v_proj"
            cfg = form.validate_with({"store": "/tmp/store"})
            assert cfg.mix == {"run-a": 0.5, "run-b": 1.0} and cfg.method == "qlora"
            assert cfg.target_modules == ["q_proj", "v_proj"]

    asyncio.run(drive())
