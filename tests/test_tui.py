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

import pytest
from conftest import clone_run

from appliance import jobs
from appliance.config import TrainConfig
from appliance.data.sample import shipped_path
from appliance.store import Store
from tui.app import ApplianceApp
from tui.screens.home import HomeScreen

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
    """A store with three runs at different stages, written by hand (no jobs), for Home."""
    if root.exists():
        shutil.rmtree(root)
    store = Store.open(root)
    for name, stages in (("run-20261101-090000-aaaaaa", ["data"]), ("run-20261102-090000-bbbbbb", ["data", "train"]),
                         ("run-20261103-090000-cccccc", ["data", "train", "eval"])):
        run = store.runs_dir / name
        (run / "data").mkdir(parents=True)
        (run / "data" / "data_report.json").write_text("{}")
        (run / "run.yaml").write_text("data:\n  task: classification\n")
        if "train" in stages:
            (run / "adapter").mkdir()
        if "eval" in stages:
            (run / "eval").mkdir()
            (run / "eval" / "comparison.json").write_text(json.dumps(
                {"primary": "accuracy", "targets": [{"target": "tuned", "score": {"point": 0.952}}]}))
    _fake_results(store.runs_dir / "run-20261103-090000-cccccc")
    for run in store.runs_dir.iterdir():
        stamp = 1_800_000_000 + int(run.name[10:12]) * 60  # a fixed order for the snapshots
        os.utime(run, (stamp, stamp))
    return store


def _fake_results(run: Path) -> None:
    """Data, evaluation, export and manifest files shaped like the stages write them, for the snapshots."""
    (run / "data" / "data_report.json").write_text(json.dumps({
        "counts": {"rows_read": 480, "invalid": 2, "pii_dropped": 0, "duplicates_exact": 14, "duplicates_near": 0,
                   "train": 370, "val": 47, "test": 47, "moved_to_train": 3},
        "formats": {"/data/tickets.csv": "table"},
        "problems": [{"file": "/data/tickets.csv", "line": 17, "field": "category", "reason": "empty label"},
                     {"file": "/data/tickets.csv", "line": 212, "field": "", "reason": "row has 4 columns, the "
                      "header has 3"}],
        "pii": {"mode": "redact", "rows_with_pii": 2, "counts": {"EMAIL": 2, "PHONE": 1},
                "masked_samples": {"EMAIL": ["a**@****.**", "b*@*****.***"], "PHONE": ["+* *** *** ****"]},
                "dropped": [], "previews": [
                    {"source": "/data/tickets.csv:3", "role": "user", "types": ["EMAIL", "PHONE"],
                     "before": "I am a**@****.**, call +* *** *** ****", "after": "I am <EMAIL_1>, call <PHONE_1>"}]},
        "duplicates": {"exact": [{"source": "/data/tickets.csv:9", "duplicate_of": "/data/tickets.csv:4"}],
                       "near": [], "near_threshold": None},
        "contamination": {"checked": True, "threshold": 0.9, "action": "moved to train",
                          "rows": [{"source": "/data/tickets.csv:44", "cosine": 0.931}]},
        "labels": {"set": ["billing", "network", "printer"],
                   "distribution": {"train": {"billing": 120, "network": 130, "printer": 120},
                                    "val": {"billing": 15, "network": 17, "printer": 15},
                                    "test": {"billing": 16, "network": 16, "printer": 15}}},
        "lengths": {"rows": 464, "p50": 86, "p95": 102, "max": 111, "truncated": 0, "max_seq_len": 1024,
                    "padding_efficiency": 0.89, "packing_efficiency": 0.96,
                    "bins": {"edges": [0, 20, 40, 60, 80, 100, 120], "counts": [0, 0, 12, 150, 260, 42]}},
    }))
    labels = ["billing", "network", "printer"]
    references = ["billing", "network", "printer", "network"]
    answers = {"base": ["network", "network", "billing", "printer"], "tuned": references}
    targets = []
    for name, predicted in answers.items():
        correct = sum(a == b for a, b in zip(predicted, references, strict=True))
        matrix = [[sum(1 for r, p in zip(references, predicted, strict=True) if r == t and p == q) for q in labels]
                  for t in labels]
        score = {"point": correct / 4, "low": max(0.0, correct / 4 - 0.25), "high": min(1.0, correct / 4 + 0.25)}
        (run / "eval" / f"{name}.json").write_text(json.dumps({
            "target": name, "predictions": predicted, "samples": [{"reference": r} for r in references],
            "report": {"labels": labels, "confusion_columns": labels, "confusion": matrix}}))
        targets.append({"target": name, "score": score, "macro_f1": score, "size_bytes": 270_000_000,
                        "tokens_per_s": 40.0})
    (run / "eval" / "comparison.json").write_text(json.dumps({
        "task": "classification", "primary": "accuracy", "targets": targets,
        "comparisons": [{"sentence": "tuned is 75.0 points ahead of base (95% CI 25.0 to 100.0): beyond noise"}],
        "recommendation": None, "note": "evaluate the tuned model and at least one exported GGUF to get a "
                                        "recommendation"}))
    checks = [{"name": "chat template", "status": "pass", "detail": "identical to the training template"},
              {"name": "greedy parity", "status": "pass", "detail": "same greedy tokens as the merged model"},
              {"name": "stops", "status": "warn", "detail": "ended its turn on 5 of 6 prompts"}]
    (run / "gguf").mkdir()
    (run / "gguf" / "verification.json").write_text(json.dumps({
        "name": "demo-cccccc", "contract": {}, "rejected": [], "rejected_dir": None, "files": [
            {"file": "demo-cccccc-F16.gguf", "quant": "F16", "size_bytes": 270_885_792, "checks": checks,
             "agreement": 1.0, "ppl_delta": None, "passed": True},
            {"file": "demo-cccccc-Q8_0.gguf", "quant": "Q8_0", "size_bytes": 144_810_912, "checks": checks,
             "agreement": 0.96, "ppl_delta": 0.0171, "passed": True}]}))
    (run / "manifest.json").write_text(json.dumps({
        "created": "2026-11-03T09:00:00+00:00", "versions": {"appliance": "0.1.0", "llama.cpp": "0.3.36"},
        "signature": {"algorithm": "ed25519", "key_id": "0123456789abcdef"},
        "inputs": {"data": [{"path": "/data/tickets.csv", "sha256": "a" * 64, "bytes": 84_837}],
                   "base_model": {"name": "smollm2-135m-instruct",
                                  "files": {"config.json": {"sha256": "b" * 64, "bytes": 818}}}},
        "files": {"adapter/adapter_model.safetensors": {"sha256": "c" * 64, "bytes": 9_823_216},
                  "gguf/demo-cccccc-Q8_0.gguf": {"sha256": "d" * 64, "bytes": 144_810_912}}}))


def test_home_shows_the_machine_the_store_and_every_run(tmp_path: Path) -> None:
    store = _fake_store(tmp_path / "store")

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: "offline guard" in _text(app, "#doctor"), 10, "the doctor summary")
            doctor = _text(app, "#doctor")
            assert "✓ GPU: none: training runs on the CPU" in doctor and "llama.cpp: llama-cpp-python 0.3.36" in doctor
            assert "3 run(s)" in _text(app, "#store")
            table = app.screen.query_one("#runs")
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]  # type: ignore[attr-defined]
            assert [r[0] for r in rows] == ["run-20261103-090000-cccccc", "run-20261102-090000-bbbbbb",
                                            "run-20261101-090000-aaaaaa"]
            assert rows[0][2] == "data train export eval" and rows[0][5] == "tuned accuracy 100.0"
            await pilot.press("ctrl+p")  # the command palette has an entry per run
            await pilot.press(*"train run-20261101")
            await _until(pilot, lambda: bool(_palette(app)), 10, "the palette's matches")
            assert "Train run-20261101-090000-aaaaaa" in _palette(app)
            await pilot.press("enter")
            await _until(pilot, lambda: type(app.screen).__name__ == "TrainScreen", 10, "the train screen")
            assert app.screen.run_id == "run-20261101-090000-aaaaaa"  # type: ignore[attr-defined]

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
        from tui.screens.chat import ChatScreen

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
def test_the_whole_pipeline_new_run_data_train_export_chat(scratch_store: Store) -> None:
    """From the keyboard: a new run on the sample (inspected, columns suggested), its data report,
    three training steps with live progress, one verified quantization, and one chat message."""
    store = scratch_store
    sample = str(shipped_path())

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("n")
            await pilot.pause()
            app.screen.query_one("#nr-path").value = sample  # type: ignore[attr-defined]
            await _until(pilot, lambda: "suggested: classification" in _text(app, "#nr-files"), 20, "inspection")
            assert "helpdesk.csv: csv, table" in _text(app, "#nr-files")
            assert app.screen.query_one("#nr-label_field").value == "category"  # type: ignore[attr-defined]
            assert app.screen.query_one("#nr-text_field").value == "text"  # type: ignore[attr-defined]
            assert app.screen.query_one("#nr-model").value == "smollm2-135m-instruct"  # type: ignore[attr-defined]
            app.screen.query_one("#nr-near-dup").value = False  # type: ignore[attr-defined]  # faster
            await pilot.press("ctrl+s")
            await _until(pilot, lambda: bool(app.screen.query("#data-counts"))
                         and app.screen.query_one("#data-counts").row_count > 0, 300,  # type: ignore[attr-defined]
                         "the data job and its report on the data screen")

            screen = app.screen  # the data screen of the new run
            run_id = screen.run_id  # type: ignore[attr-defined]
            counts = screen.query_one("#data-counts")
            rows = {str(counts.get_row_at(i)[0]): str(counts.get_row_at(i)[1])  # type: ignore[attr-defined]
                    for i in range(counts.row_count)}  # type: ignore[attr-defined]
            assert rows["rows read"] == "480" and int(rows["train"]) > 300
            assert "no problems" in _text(app, "#data-problems-note")
            preview = _text(app, "#data-pii-preview")
            assert "Before and after (8 rows)" in preview and "<EMAIL_1>" in preview
            report = json.loads((store.runs_dir / run_id / "data" / "data_report.json").read_text())
            assert f"{report['lengths']['p50']}" in _text(app, "#data-lengths-note")

            await pilot.press("f2")  # train it
            await pilot.pause()
            screen = app.screen
            assert type(screen).__name__ == "TrainScreen" and screen.run_id == run_id  # type: ignore[attr-defined]
            for name, value in (("max_steps", "3"), ("batch_size", "2"), ("max_seq_len", "128"),
                                ("eval_every", "1000")):  # one evaluation, at the end
                screen.query_one(f"#f-{name}").value = value  # type: ignore[attr-defined]
            screen.query_one("#f-batch_size").value = "0"  # type: ignore[attr-defined]
            await pilot.pause()
            assert "batch size" in _text(app, "#train-errors")  # checked as you type
            screen.query_one("#f-batch_size").value = "2"  # type: ignore[attr-defined]
            await _until(pilot, lambda: "memory plan" in _text(app, "#train-plan"), 20, "the memory plan")
            assert "fits" in _text(app, "#train-plan")
            await pilot.click("#start")
            await _until(pilot, lambda: "done" in _text(app, "#train-status"), 600, "training to finish")
            assert "3 steps" in _text(app, "#train-status")
            assert screen.curves["train loss"][0] == [1, 2, 3]  # type: ignore[attr-defined]
            assert (store.runs_dir / run_id / "adapter" / "adapter_model.safetensors").is_file()

            await pilot.press("f4")  # export one quantization through the gate
            await pilot.pause()
            screen = app.screen
            chooser = screen.query_one("#export-quants")
            chooser.deselect_all()  # type: ignore[attr-defined]
            chooser.select("Q8_0")  # type: ignore[attr-defined]
            screen.query_one("#export-ppl").value = "128"  # type: ignore[attr-defined]
            await pilot.click("#export-start")
            await _until(pilot, lambda: "done" in _text(app, "#export-status"), 600, "the export")
            assert "passed the verification gate" in _text(app, "#export-status")
            files = _text(app, "#export-files")
            assert "-Q8_0.gguf: verified" in files and "-F16.gguf: verified" in files and "Modelfile" in files

            await pilot.press("c")  # and chat with it
            await _until(pilot, lambda: "verified" in _text(app, "#chat-title"), 120, "the model")
            app.screen.query_one("#chat-input").value = "My laptop will not connect to the VPN."  # type: ignore[attr-defined]
            await pilot.press("enter")
            await pilot.pause(0.5)
            await _until(pilot, lambda: not app.screen.answering, 120, "the answer")  # type: ignore[attr-defined]
            bubbles = [b.text for b in app.screen.query(".bubble")]  # type: ignore[attr-defined]
            assert bubbles[1] in report["labels"]["set"], bubbles
            await pilot.press("escape")
            await pilot.press("h")
            assert isinstance(app.screen, HomeScreen)
            table = app.screen.query_one("#runs")
            assert str(table.get_row(run_id)[2]) == "data train export"  # type: ignore[attr-defined]

    asyncio.run(drive())


def _long_training(store: Store, source: Path, name: str, steps: int) -> tuple[Path, TrainConfig]:
    run_dir = clone_run(store, source, name)
    cfg = TrainConfig(store=str(store.root), max_steps=steps, batch_size=2, max_seq_len=128, eval_every=1000,
                      save_every=1000, backend="hf")
    store.record_config(run_dir, "train", cfg.model_dump(mode="json", exclude={"resume"}))
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
            screen._follow(jobs.start("train", run_dir, cfg))  # type: ignore[attr-defined]
            await _until(pilot, lambda: "step" in _text(app, "#train-status"), 300, "the first step")
            os.kill(screen.job.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            await _until(pilot, lambda: "Job ended unexpectedly" in _text(app, "#train-status"), 60, "the error")
            assert "killed" in _text(app, "#train-status")
            assert not app.screen.query_one("#start").disabled  # ready to start again
            await pilot.press("escape")
            await pilot.press("r")
            table = app.screen.query_one("#runs")
            assert str(table.get_row(run_dir.name)[4]) == "failed"  # type: ignore[attr-defined]

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
            app.screen._follow(jobs.start("train", run_dir, cfg))  # type: ignore[attr-defined]
            await _until(pilot, lambda: "step" in _text(app, "#train-status"), 300, "the first step")
            pid: int = app.screen.job.pid  # type: ignore[attr-defined]
        return pid  # the app is gone; the job is not

    async def second_session(pid: int) -> None:
        assert jobs.attach(run_dir) is not None and jobs.attach(run_dir).running()  # type: ignore[union-attr]
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            table = app.screen.query_one("#runs")
            await pilot.pause()
            assert str(table.get_row(run_dir.name)[4]) == "running"  # type: ignore[attr-defined]
            app.open_run(run_dir.name)
            await pilot.pause()
            screen = app.screen
            assert screen.job.pid == pid and screen.query_one("#stop").disabled is False  # type: ignore[attr-defined]
            await _until(pilot, lambda: len(screen.curves.get("train loss", ([], []))[0]) >= 2, 120,  # type: ignore[attr-defined]
                         "the replayed history")
            assert screen.curves["train loss"][0][0] == 1  # type: ignore[attr-defined]  # from the first step on
            await pilot.click("#stop")  # and it can be stopped from here
            await _until(pilot, lambda: "Cancelled" in _text(app, "#train-status"), 120, "the stop")
            assert not jobs.attach(run_dir).running()  # type: ignore[union-attr]
            assert (run_dir / "checkpoints").is_dir()  # a checkpoint to resume from

    asyncio.run(second_session(asyncio.run(first_session())))


@pytest.mark.slow
def test_chat_streams_an_answer_and_locks_the_input(exported: tuple[Store, Path, dict[str, Any]]) -> None:
    store, run_dir, result = exported
    labels = json.loads((run_dir / "data" / "data_report.json").read_text())["labels"]["set"]

    async def drive() -> None:
        from tui.screens.chat import ChatScreen

        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.push_screen(ChatScreen(result["name"], quant="Q8_0", temperature=0))
            await _until(pilot, lambda: "verified" in _text(app, "#chat-title"), 120, "the model")
            assert "answers held to its labels" in _text(app, "#chat-title")
            box = app.screen.query_one("#chat-input")
            box.value = "The printer on floor 3 jams on every job."  # type: ignore[attr-defined]
            screen = app.screen
            locked: list[bool] = []  # the input's state each time a piece of the answer arrives
            show = screen._piece  # type: ignore[attr-defined]

            def spy(answer: Any, piece: str) -> None:
                locked.append(box.disabled)
                show(answer, piece)

            screen._piece = spy  # type: ignore[attr-defined]
            await pilot.press("enter")
            await _until(pilot, lambda: bool(locked) and not screen.answering, 120, "the answer")  # type: ignore[attr-defined]
            assert all(locked)  # locked while the model answers
            bubbles = [b.text for b in app.screen.query(".bubble")]  # type: ignore[attr-defined]
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
        assert "steps" in train and "Start" in train
        subprocess.run(["tmux", "send-keys", "-t", session, "Escape"], check=True)
        wait_for("This machine")
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        assert "EXITED 0" in wait_for("EXITED")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


@pytest.mark.slow
def test_export_results_and_audit_verify_on_the_real_export(exported: tuple[Store, Path, dict[str, Any]]) -> None:
    store, run_dir, result = exported

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            app.open_run(run_dir.name, "export")
            await pilot.pause(0.5)
            files = _text(app, "#export-files")
            assert f"{result['name']}-Q8_0.gguf: verified" in files and "Modelfile" in files
            checks = app.screen.query_one("#export-checks")
            rows = [[str(c) for c in checks.get_row_at(i)] for i in range(checks.row_count)]  # type: ignore[attr-defined]
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
            table = app.screen.query_one("#models-table")
            assert str(table.get_row("smollm2-135m-instruct")[0]) == "smollm2-135m-instruct"  # type: ignore[attr-defined]
            detail = _text(app, "#models-detail")
            assert "llama" in detail and "30 layers" in detail and "license: apache-2.0" in detail.lower()

    asyncio.run(drive())


@pytest.mark.slow
def test_serve_screen_starts_the_endpoint_shows_requests_and_stops_it(
        exported: tuple[Store, Path, dict[str, Any]]) -> None:
    import httpx

    store, _run_dir, result = exported
    port = 18000 + os.getpid() % 1000

    async def drive() -> None:
        app = _app(store)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("s")
            await pilot.pause()
            app.screen.query_one("#serve-model").value = result["name"]  # type: ignore[attr-defined]
            app.screen.query_one("#serve-port").value = str(port)  # type: ignore[attr-defined]
            app.screen.query_one("#serve-host").value = "0.0.0.0"  # type: ignore[attr-defined]
            await pilot.click("#serve-start")
            assert app.server is None  # refused: a public address needs a key
            app.screen.query_one("#serve-key").value = True  # type: ignore[attr-defined]
            await pilot.pause(0.6)  # a button ignores presses during its press effect
            await pilot.click("#serve-start")
            await _until(pilot, lambda: "serving" in _text(app, "#serve-status"), 180, "the endpoint")
            assert app.server is not None and app.server["key"] in _text(app, "#serve-status")
            headers = {"Authorization": f"Bearer {app.server['key']}"}
            reply = await asyncio.to_thread(httpx.post, f"http://127.0.0.1:{port}/v1/chat/completions",
                                            json={"messages": [{"role": "user", "content": "The VPN drops."}]},
                                            headers=headers, timeout=120)
            assert reply.status_code == 200
            table = app.screen.query_one("#serve-requests")
            await _until(pilot, lambda: table.row_count >= 1, 20, "the request in the log")  # type: ignore[attr-defined]
            assert [str(c) for c in table.get_row_at(0)][2:4] == ["/v1/chat/completions", "200"]  # type: ignore[attr-defined]
            await pilot.click("#serve-stop")
            await _until(pilot, lambda: "stopped" in _text(app, "#serve-status"), 60, "the endpoint to stop")

    asyncio.run(drive())
