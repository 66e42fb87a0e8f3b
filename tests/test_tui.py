"""The terminal UI, driven with Textual's pilot: Home, a new run's data, training with live
progress, a job killed from outside, re-attaching after a restart, and chat; snapshots of Home."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakes
import pytest
from conftest import EXPORT_PPL_TOKENS, TINY_MODEL, clone_run, run_cli
from textual.widgets import Button, Checkbox, DataTable, Input, Select, SelectionList

from appliance import jobs
from appliance.config import DataConfig, TrainConfig
from appliance.data.sample import shipped_path
from appliance.records import ExportResult, TrainResult
from appliance.run import Run
from appliance.store import Store
from tui.app import ApplianceApp
from tui.screens.base import RunScreen
from tui.screens.chat import Bubble, ChatScreen
from tui.screens.home import HomeScreen
from tui.screens.train import TrainScreen
from tui.widgets.job_panel import JobPanel

DOCTOR = {"ok": True, "checks": [
    {"name": "gpu", "status": "ok", "detail": "none: training runs on the CPU (slower)"},
    {"name": "memory", "status": "ok", "detail": "23.5 GiB RAM, 22.7 GiB available"},
    {"name": "backend unsloth", "status": "ok", "detail": "unsloth 2026.10.9 (CPU fallback)"},
    {"name": "llama.cpp runtime", "status": "ok", "detail": "llama-cpp-python 0.3.36, ggml 0.25.3"},
    {"name": "egress guard", "status": "ok", "detail": "on: only loopback connections are allowed"}]}
SNAPSHOT_STORE = Path("/tmp/appliance-tui-snapshot-store")


def _app(store: Store) -> ApplianceApp:
    return ApplianceApp(store, doctor=lambda: DOCTOR)


def _text(app: ApplianceApp, selector: str) -> str:
    from textual.css.query import NoMatches

    try:
        return str(app.screen.query_one(selector).render())
    except NoMatches:  # not composed yet
        return ""


async def _until(pilot: Any, condition: Callable[[], bool], seconds: float, what: str) -> None:
    for _ in range(int(seconds / 0.25)):
        if condition():
            return
        await pilot.pause(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _palette(app: ApplianceApp) -> list[str]:
    from textual.command import CommandList

    found = app.screen.query(CommandList)
    if not found:
        return []
    options = found.first()
    return [str(options.get_option_at_index(i).prompt).split("\n")[0] for i in range(options.option_count)]


def _fake_store(root: Path) -> Store:
    """A store with three runs at different stages, made of records (no jobs), for Home."""
    if root.exists():
        shutil.rmtree(root)
    store = Store.open(root)
    for name, stages in (("run-20261101-090000-aaaaaa", ["data"]), ("run-20261102-090000-bbbbbb", ["data", "train"]),
                         ("run-20261103-090000-cccccc", ["data", "train", "eval"])):
        run = store.new_run(name)
        report = fakes.data_report(store)
        run.write_data_report(report)
        run.record("data", report.config or DataConfig(inputs=["/data/tickets.csv"], store=str(store.root)))
        if "train" in stages:
            run.adapter_dir.mkdir()
        if "eval" in stages:
            _fake_results(run)
    for run in store.runs():
        stamp = 1_800_000_000 + int(run.id[10:12]) * 60  # a fixed order for the snapshots
        os.utime(run.path, (stamp, stamp))
    return store


def _fake_results(run: Run) -> None:
    """Evaluation, export and manifest records of one run, for the snapshots."""
    for result in fakes.evaluations():
        run.write_evaluation(result)
    run.write_comparison(fakes.comparison(run.id))
    run.write_verification(fakes.verification(run.id))
    run.manifest_path.write_text(fakes.manifest(run.id).model_dump_json(indent=2))


def test_home_shows_the_machine_the_store_and_every_run(tmp_path: Path) -> None:
    store = _fake_store(tmp_path / "store")

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: "offline guard" in _text(app, "#doctor"), 10, "the doctor summary")
            doctor = _text(app, "#doctor")
            assert "✓ GPU: none: training runs on the CPU" in doctor and "llama.cpp: llama-cpp-python 0.3.36" in doctor
            assert "3 run(s)" in _text(app, "#store")
            table = app.screen.query_one("#runs", DataTable)
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            assert [r[0] for r in rows] == ["run-20261103-090000-cccccc", "run-20261102-090000-bbbbbb",
                                            "run-20261101-090000-aaaaaa"]
            assert rows[0][2] == "data train export eval" and rows[0][5] == "tuned accuracy 100.0"
            await pilot.press("ctrl+p")  # the command palette has an entry per run
            await pilot.press(*"train run-20261101")
            await _until(pilot, lambda: bool(_palette(app)), 10, "the palette's matches")
            assert "Train run-20261101-090000-aaaaaa" in _palette(app)
            await pilot.press("enter")
            await _until(pilot, lambda: type(app.screen).__name__ == "TrainScreen", 10, "the train screen")
            assert isinstance(app.screen, RunScreen) and app.screen.run_id == "run-20261101-090000-aaaaaa"

    asyncio.run(drive())


def test_snapshot_home_120x40(snap_compare: Any) -> None:
    store = _fake_store(SNAPSHOT_STORE)
    assert snap_compare(_app(store), terminal_size=(120, 40), run_before=_settle)


def test_snapshot_home_80x24(snap_compare: Any) -> None:
    store = _fake_store(SNAPSHOT_STORE)
    assert snap_compare(_app(store), terminal_size=(80, 24), run_before=_settle)


SCREENS = ["data", "train", "evaluate", "export", "audit"]


@pytest.mark.parametrize("key", ["m", "s"])
def test_snapshot_models_and_serve_120x40(snap_compare: Any, key: str) -> None:
    store = _fake_store(SNAPSHOT_STORE)

    async def open_screen(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press(key)
        await pilot.pause(0.5)
        _no_blink(pilot)
        await pilot.pause()

    assert snap_compare(_app(store), terminal_size=(120, 40), run_before=open_screen)


@pytest.mark.parametrize("stage", SCREENS)
def test_snapshot_run_screens_120x40(snap_compare: Any, stage: str) -> None:
    store = _fake_store(SNAPSHOT_STORE)

    async def open_stage(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_run("run-20261103-090000-cccccc", stage)
        await pilot.pause(0.5)
        _no_blink(pilot)
        await pilot.pause()

    assert snap_compare(_app(store), terminal_size=(120, 40), run_before=open_stage)


def _no_blink(pilot: Any) -> None:
    from textual.widgets import Input

    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False


def test_snapshot_new_run_120x40(snap_compare: Any) -> None:
    store = _fake_store(SNAPSHOT_STORE)

    async def new_run(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("n")
        await pilot.pause(0.5)
        _no_blink(pilot)
        await pilot.pause()

    assert snap_compare(_app(store), terminal_size=(120, 40), run_before=new_run)


def test_snapshot_chat_without_a_model_file_120x40(snap_compare: Any) -> None:
    """The chat screen of a run whose GGUF is gone says why instead of crashing."""
    store = _fake_store(SNAPSHOT_STORE)

    async def chat(pilot: Any) -> None:

        await _settle(pilot)
        pilot.app.push_screen(ChatScreen("run-20261103-090000-cccccc"))
        await _until(pilot, lambda: "no longer there" in _text(pilot.app, "#chat-title"), 20, "the chat error")
        _no_blink(pilot)
        await pilot.pause()

    assert snap_compare(_app(store), terminal_size=(120, 40), run_before=chat)


async def _settle(pilot: Any) -> None:
    await _until(pilot, lambda: "offline guard" in _text(pilot.app, "#doctor"), 10, "the doctor summary")
    await pilot.pause()


@pytest.mark.slow
def test_the_whole_pipeline_new_run_data_train(scratch_store: Store) -> None:
    """From the keyboard: a new run on the sample (inspected, columns suggested), its data report (the same
    settings recorded as the CLI records), and three training steps with live progress. Exporting from the
    TUI and chatting run on the session's exported run (below), not on a second export of their own."""
    store = scratch_store
    sample = str(shipped_path())

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("n")
            await pilot.pause()
            app.screen.query_one("#nr-path", Input).value = sample
            await _until(pilot, lambda: "suggested: classification" in _text(app, "#nr-files"), 20, "inspection")
            assert "helpdesk.csv: csv, table" in _text(app, "#nr-files")
            assert app.screen.query_one("#nr-label_field", Select).value == "category"
            assert app.screen.query_one("#nr-text_field", Select).value == "text"
            assert app.screen.query_one("#nr-model", Select).value == "smollm2-135m-instruct"
            await _until(pilot, lambda: "pipeline plan" in _text(app, "#nr-plan"), 20, "the pipeline's plan")
            assert "fits this machine" in _text(app, "#nr-plan")  # the 135M default fits wherever tests run
            app.screen.query_one("#f-near_dup", Checkbox).value = False  # faster
            app.screen.query_one("#f-pii_entities", Input).value = ""  # faster: names and addresses in test_pii
            await pilot.press("ctrl+s")
            await _until(pilot, lambda: bool(app.screen.query("#data-counts"))
                         and app.screen.query_one("#data-counts", DataTable).row_count > 0, 300,
                         "the data job and its report on the data screen")

            screen = app.screen  # the data screen of the new run
            assert isinstance(screen, RunScreen)
            run_id = screen.run_id
            counts = screen.query_one("#data-counts", DataTable)
            rows = {str(counts.get_row_at(i)[0]): str(counts.get_row_at(i)[1]) for i in range(counts.row_count)}
            assert rows["rows read"] == "480" and int(rows["train"]) > 300
            assert "no problems" in _text(app, "#data-problems-note")
            preview = _text(app, "#data-pii-preview")
            assert "Before and after (8 rows)" in preview and "<EMAIL_1>" in preview
            report = store.run(run_id).require_data_report()
            assert report.lengths is not None and f"{report.lengths.p50}" in _text(app, "#data-lengths-note")
            # the same preparation from the command line records the same settings
            cli = run_cli("data", "prepare", sample, "--task", "classification", "--text-field", "text",
                          "--label-field", "category", "--model", "smollm2-135m-instruct", "--no-near-dup",
                          "--pii-entities", "",
                          "--run", "from-the-cli", "--json", store=store.root)
            assert cli.returncode == 0, cli.stderr
            assert store.run("from-the-cli").config_path.read_text() == store.run(run_id).config_path.read_text()

            await pilot.press("f2")  # train it
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TrainScreen) and screen.run_id == run_id
            for name, value in (("max_steps", "3"), ("batch_size", "2"), ("grad_accum", "1"), ("max_seq_len", "128"),
                                ("eval_every", "1000"), ("task_eval_items", "0")):  # one evaluation, at the end
                screen.query_one(f"#f-{name}", Input).value = value
            screen.query_one("#f-batch_size", Input).value = "0"
            await pilot.pause()
            assert "batch size" in _text(app, "#train-errors")  # checked as you type
            screen.query_one("#f-batch_size", Input).value = "2"
            await _until(pilot, lambda: "memory plan" in _text(app, "#train-plan"), 20, "the memory plan")
            assert "fits" in _text(app, "#train-plan")
            await pilot.click("#start")
            await _until(pilot, lambda: "done" in _text(app, "#train-status"), 600, "training to finish")
            assert "3 steps" in _text(app, "#train-status")
            assert screen.curves["train loss"][0] == [1, 2, 3]
            assert (store.runs_dir / run_id / "adapter" / "adapter_model.safetensors").is_file()

            await pilot.press("escape")
            await pilot.press("h")
            assert isinstance(app.screen, HomeScreen)
            table = app.screen.query_one("#runs", DataTable)
            assert str(table.get_row(run_id)[2]) == "data train"  # export and chat: on the session's export below

    asyncio.run(drive())


def _long_training(store: Store, source: Path, name: str, steps: int) -> tuple[Path, TrainConfig]:
    run_dir = clone_run(store, source, name)
    cfg = TrainConfig(store=str(store.root), max_steps=steps, batch_size=2, max_seq_len=128, eval_every=1000,
                      save_every=1000, backend="hf")
    Run.at(run_dir).record("train", cfg)
    return run_dir, cfg


@pytest.mark.slow
def test_a_job_killed_from_outside_is_an_error_and_the_app_keeps_working(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir, cfg = _long_training(store, source, "tui-killed", 500)

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name)
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TrainScreen)
            screen._follow(jobs.start("train", run_dir, cfg))
            await _until(pilot, lambda: "step" in _text(app, "#train-status"), 300, "the first step")
            assert screen.job is not None
            os.kill(screen.job.pid, signal.SIGKILL)
            await _until(pilot, lambda: "Job ended unexpectedly" in _text(app, "#train-status"), 60, "the error")
            assert "killed" in _text(app, "#train-status")
            assert not app.screen.query_one("#start", Button).disabled  # ready to start again
            await pilot.press("escape")
            await pilot.press("r")
            table = app.screen.query_one("#runs", DataTable)
            assert str(table.get_row(run_dir.name)[4]) == "failed"

    asyncio.run(drive())


@pytest.mark.slow
def test_a_restarted_app_reattaches_to_the_running_job(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir, cfg = _long_training(store, source, "tui-reattach", 400)

    async def first_session() -> int:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name)
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TrainScreen)
            screen._follow(jobs.start("train", run_dir, cfg))
            await _until(pilot, lambda: "step" in _text(app, "#train-status"), 300, "the first step")
            assert screen.job is not None
            pid = screen.job.pid
        return pid  # the app is gone; the job is not

    async def second_session(pid: int) -> None:
        job = jobs.attach(run_dir)
        assert job is not None and job.running()
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            table = app.screen.query_one("#runs", DataTable)
            await pilot.pause()
            assert str(table.get_row(run_dir.name)[4]) == "running"
            app.open_run(run_dir.name)
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, TrainScreen) and screen.job is not None and screen.job.pid == pid
            assert screen.query_one("#stop", Button).disabled is False
            await _until(pilot, lambda: len(screen.curves.get("train loss", ([], []))[0]) >= 2, 120,
                         "the replayed history")
            assert screen.curves["train loss"][0][0] == 1  # from the first step on
            await pilot.click("#stop")  # and it can be stopped from here
            await _until(pilot, lambda: "Cancelled" in _text(app, "#train-status"), 120, "the stop")
            assert not job.running()
            assert (run_dir / "checkpoints").is_dir()  # a checkpoint to resume from

    asyncio.run(second_session(asyncio.run(first_session())))


@pytest.mark.slow
def test_chat_streams_an_answer_and_locks_the_input(exported: tuple[Store, Path, ExportResult]) -> None:
    store, run_dir, result = exported
    labels = Run.at(run_dir).require_data_report().label_set

    async def drive() -> None:

        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.push_screen(ChatScreen(result.name, quant="Q8_0", temperature=0))
            await _until(pilot, lambda: "verified" in _text(app, "#chat-title"), 120, "the model")
            assert "answers held to its labels" in _text(app, "#chat-title")
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            box = screen.query_one("#chat-input", Input)
            box.value = "The printer on floor 3 jams on every job."
            locked: list[bool] = []  # the input's state each time a piece of the answer arrives
            show = screen._piece

            def spy(answer: Any, piece: str) -> None:
                locked.append(box.disabled)
                show(answer, piece)

            screen._piece = spy  # type: ignore[method-assign]  # a spy on what the screen shows
            await pilot.press("enter")
            await _until(pilot, lambda: bool(locked) and not screen.answering, 120, "the answer")
            assert all(locked)  # locked while the model answers
            bubbles = [b.text for b in screen.query(Bubble)]
            assert bubbles[0] == "The printer on floor 3 jams on every job." and bubbles[1] in labels
            assert not box.disabled

    asyncio.run(drive())



def test_the_real_tui_in_tmux(tmp_path: Path) -> None:
    """`appliance` with no arguments opens the TUI in a real terminal; keys drive it; ctrl+q leaves."""
    import subprocess
    import sys
    import time

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    store = _fake_store(tmp_path / "store")
    session = f"appliance-test-{os.getpid()}"
    command = f"APPLIANCE_HOME={store.root} {sys.executable} -m appliance; echo EXITED $?; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                              check=True).stdout

    def wait_for(text: str, seconds: float = 30) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the screen shows:\n{screen()}")

    try:
        home = wait_for("run-20261103-090000-cccccc")
        assert "This machine" in home and "3 run(s)" in home
        wait_for("✓ GPU:")  # the real doctor ran in its own process
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        train = wait_for("Train run-20261103-090000-cccccc")
        assert "method" in train and "Start" in train
        subprocess.run(["tmux", "send-keys", "-t", session, "Escape"], check=True)
        wait_for("This machine")
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        assert "EXITED 0" in wait_for("EXITED")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


@pytest.mark.slow
def test_export_started_from_the_tui_and_the_audit_verify(exported: tuple[Store, Path, ExportResult]) -> None:
    """Export the session's exported run again from the Export screen (its files are reused: same adapter, same
    settings), read the gate's checks, and verify the signed manifest from the Audit screen."""
    store, run_dir, result = exported

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name, "export")
            await pilot.pause(0.5)
            screen = app.screen
            chooser: SelectionList[str] = screen.query_one("#export-quants", SelectionList)
            chooser.deselect_all()
            chooser.select("Q8_0")
            screen.query_one("#export-ppl", Input).value = str(EXPORT_PPL_TOKENS)  # as the session's: nothing redone
            panel = screen.query_one(JobPanel)
            await _until(pilot, lambda: panel.job is not None and not panel.running, 30, "the last export shown")
            shown = panel.job
            await pilot.click("#export-start")
            await _until(pilot, lambda: panel.job is not shown and not panel.running
                         and "done" in _text(app, "#export-status"), 300, "the export")
            assert "passed the verification gate" in _text(app, "#export-status")
            assert "already exported and verified from this adapter; kept" in _log_text(app, "#export-log")
            files = _text(app, "#export-files")
            assert "-F16.gguf: verified" in files
            assert f"{result.name}-Q8_0.gguf: verified" in files and "Modelfile" in files
            checks = app.screen.query_one("#export-checks", DataTable)
            rows = [[str(c) for c in checks.get_row_at(i)] for i in range(checks.row_count)]
            assert rows[[r[1] for r in rows].index("greedy parity")][:3] == ["F16", "greedy parity", "pass"]
            await pilot.press("f5")  # the same run's audit
            await pilot.pause(0.5)
            assert type(app.screen).__name__ == "AuditScreen"
            await pilot.press("v")
            await _until(pilot, lambda: "verified" in _text(app, "#audit-result"), 120, "verification")
            assert "NOT" not in _text(app, "#audit-result") and "signature valid" in _text(app, "#audit-result")

    asyncio.run(drive())


def test_models_screen_lists_the_default_model(default_store: Store) -> None:
    async def drive() -> None:
        app = _app(default_store)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("m")
            await pilot.pause(0.5)
            table = app.screen.query_one("#models-table", DataTable)
            assert str(table.get_row("smollm2-135m-instruct")[0]) == "smollm2-135m-instruct"
            detail = _text(app, "#models-detail")
            assert "llama" in detail and "30 layers" in detail and "license: apache-2.0" in detail.lower()

    asyncio.run(drive())


@pytest.mark.slow
def test_serve_screen_starts_the_endpoint_shows_requests_and_stops_it(
        exported: tuple[Store, Path, ExportResult]) -> None:
    import httpx

    store, _run_dir, result = exported
    port = 18000 + os.getpid() % 1000

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("s")
            await pilot.pause()
            app.screen.query_one("#serve-model", Select).value = result.name
            app.screen.query_one("#serve-port", Input).value = str(port)
            app.screen.query_one("#serve-host", Input).value = "0.0.0.0"
            await pilot.click("#serve-start")
            assert app.endpoint is None  # refused: a public address needs a key
            app.screen.query_one("#serve-key", Checkbox).value = True
            await pilot.pause(0.6)  # a button ignores presses during its press effect
            await pilot.click("#serve-start")
            await _until(pilot, lambda: "serving" in _text(app, "#serve-status"), 180, "the endpoint")
            assert app.endpoint is not None and app.endpoint.key and app.endpoint.key in _text(app, "#serve-status")
            headers = {"Authorization": f"Bearer {app.endpoint.key}"}
            reply = await asyncio.to_thread(httpx.post, f"http://127.0.0.1:{port}/v1/chat/completions",
                                            json={"messages": [{"role": "user", "content": "The VPN drops."}]},
                                            headers=headers, timeout=120)
            assert reply.status_code == 200
            table = app.screen.query_one("#serve-requests", DataTable)
            await _until(pilot, lambda: table.row_count >= 1, 20, "the request in the log")
            assert [str(c) for c in table.get_row_at(0)][2:4] == ["/v1/chat/completions", "200"]
            await pilot.click("#serve-stop")
            await _until(pilot, lambda: "stopped" in _text(app, "#serve-status"), 60, "the endpoint to stop")

    asyncio.run(drive())


def test_an_unexpected_error_in_a_worker_shows_an_error_screen_with_its_log(tmp_path: Path) -> None:
    from tui.screens.error import ErrorScreen

    store = _fake_store(tmp_path / "store")

    def broken_doctor() -> dict[str, Any]:
        raise RuntimeError("planted failure in a worker")

    async def drive() -> None:
        app = ApplianceApp(store, doctor=broken_doctor)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: "planted failure" in _text(app, "#error-message"), 10, "the error screen")
            assert isinstance(app.screen, ErrorScreen)
            assert "RuntimeError: planted failure in a worker" in _text(app, "#error-message")
            assert str(app.log_path) in _text(app, "#error-log")
            assert "RuntimeError: planted failure in a worker" in app.log_path.read_text()
            await pilot.press("escape")
            assert isinstance(app.screen, HomeScreen)  # and the app carries on

    asyncio.run(drive())


@pytest.mark.slow
def test_each_stage_screen_shows_the_last_job_of_its_own_stage(exported: tuple[Store, Path, ExportResult]) -> None:
    """After an export (and whatever ran after it), the Train screen still shows the training."""
    store, run_dir, _result = exported

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name, "train")
            await _until(pilot, lambda: "done" in _text(app, "#train-status"), 30, "the training's history")
            trained = Run.at(run_dir).result("train")
            assert isinstance(trained, TrainResult) and f"{trained.steps} steps" in _text(app, "#train-status")
            screen = app.screen
            assert isinstance(screen, TrainScreen) and screen.curves["train loss"][0][-1] == trained.steps
            await pilot.press("f4")
            await _until(pilot, lambda: "done" in _text(app, "#export-status"), 30, "the export's history")

    asyncio.run(drive())


def _log_text(app: ApplianceApp, selector: str) -> str:
    from textual.widgets import RichLog

    return "\n".join(line.text for line in app.screen.query_one(selector, RichLog).lines)


@pytest.mark.slow
def test_qlora_on_the_cpu_is_refused_by_the_planner_with_its_hint(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, "tui-qlora")

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name, "train")
            await _until(pilot, lambda: "memory plan" in _text(app, "#train-plan"), 20, "the plan")
            app.screen.query_one("#f-method", Select).value = "qlora"
            await _until(pilot, lambda: "Does not fit this machine" in _text(app, "#train-plan"), 20, "the refusal")
            assert "qlora loads the base in 4-bit" in _text(app, "#train-plan")
            assert "Use method lora here" in _text(app, "#train-plan")
            await pilot.press("ctrl+s")  # started anyway: the job is refused by the same planner
            await _until(pilot, lambda: "Does not fit this machine" in _text(app, "#train-status"), 120, "the job")
            assert "Use method lora here" in _log_text(app, "#train-log")
            assert not (run_dir / "checkpoints").exists()

    asyncio.run(drive())


@pytest.mark.slow
def test_new_run_prepares_an_extraction_run_from_a_schema_file(scratch_store: Store, tmp_path: Path) -> None:
    store = scratch_store
    schema = {"type": "object", "properties": {"device": {"type": "string"}, "floor": {"type": "integer"}},
              "required": ["device", "floor"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    devices = ["printer", "scanner", "laptop", "monitor", "phone", "router"]
    rows = [{"text": f"The {d} on floor {n} is broken again.", "output": json.dumps({"device": d, "floor": n})}
            for n in range(1, 6) for d in devices]
    data = tmp_path / "tickets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("n")
            await pilot.pause()
            app.screen.query_one("#nr-path", Input).value = str(data)
            await _until(pilot, lambda: "suggested: extraction" in _text(app, "#nr-files"), 20, "inspection")
            app.screen.query_one("#f-schema_path", Input).value = str(tmp_path / "schema.json")
            app.screen.query_one("#f-near_dup", Checkbox).value = False
            app.screen.query_one("#nr-name", Input).value = "tickets-extraction"
            await pilot.press("ctrl+s")
            await _until(pilot, lambda: bool(app.screen.query("#data-counts"))
                         and app.screen.query_one("#data-counts", DataTable).row_count > 0, 300, "the prepared data")
            await pilot.pause()  # the data screen settles before the app closes

    asyncio.run(drive())
    run = store.run("tickets-extraction")
    report = run.require_data_report()
    assert report.task == "extraction" and report.counts.train > 0 and run.schema() == schema
    assert run.settings("data")["schema_path"] == str(tmp_path / "schema.json")


@pytest.mark.slow
def test_a_sweep_started_from_the_tui_ranks_its_trials(tiny_prepared: tuple[Store, Path]) -> None:
    """Two short trainings with a useless and a useful learning rate: the useful one ranks first. (The tiny
    random-weight model: the ranking, not the model, is under test.)"""
    store, source = tiny_prepared
    run_dir = clone_run(store, source, "tui-sweep")
    Run.at(run_dir).record("train", TrainConfig(store=str(store.root), base_model=TINY_MODEL, batch_size=2,
                                                max_seq_len=128, rank=8, alpha=16, backend="hf", task_eval_items=0))

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name, "sweep")
            await pilot.pause()
            app.screen.query_one("#g-learning_rate", Input).value = "1e-6,2e-3"
            app.screen.query_one("#sweep-steps", Input).value = "4"
            await pilot.click("#sweep-start")
            await _until(pilot, lambda: "done" in _text(app, "#sweep-status"), 600, "the sweep")
            table = app.screen.query_one("#sweep-table", DataTable)
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            assert [row[:2] for row in rows] == [["1", "0.002"], ["2", "1e-06"]]

    asyncio.run(drive())
    result = Run.at(run_dir).sweep()
    assert result is not None and [t.settings["learning_rate"] for t in result.trials] == [2e-3, 1e-6]
    assert result.trials[0].eval_loss is not None and result.trials[1].eval_loss is not None
    assert result.trials[0].eval_loss < result.trials[1].eval_loss
    assert [t.steps for t in result.trials] == [4, 4]
