"""The export stage: `appliance export` as a job.

merge -> convert to the 16-bit reference GGUF -> quantize -> verification gate -> Modelfile and
serve commands -> signed manifest. Everything is built in a hidden staging folder inside the run
and becomes `gguf/` by one rename only when the gate passed, so `gguf/` never holds a file that
failed it or that is half-written. Files that fail are moved to `gguf-rejected/<time>/` with
their report, kept for inspection and never served.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from appliance import faults, gguf_meta, manifest, offload, pipeline_plan, planner, quants, templating, toolchain
from appliance.config import ExportConfig
from appliance.errors import StoreError
from appliance.events import Emitter
from appliance.export import cluster, gate
from appliance.export import modelfile as runtime_files
from appliance.export.merge import ExportError, disk_error, is_full_model, merge
from appliance.fsutil import atomic_write_text, replace_dir, sha256_file
from appliance.hardware import disk_free_mb
from appliance.records import ExportedFile, ExportResult, FileReport, MergeResult, Verification
from appliance.run import Run, plain_name
from appliance.store import Store, now_iso
from appliance.templating import ChatContract

MAX_PROMPTS = 6


def run(cfg: ExportConfig, run_dir: Path, emit: Emitter) -> ExportResult:
    started = time.monotonic()
    target = Run(Store.open(cfg.store), run_dir)
    toolchain.check_versions()
    base_name = target.base_model()
    base_dir = target.store.model_dir(base_name)
    name = cfg.name or f"{base_name}-{target.id.rsplit('-', 1)[-1]}"
    wanted = [q for q in cfg.quants if q not in ("F16", "BF16")]
    reference_quant = cfg.outtype.upper()
    _check_memory(base_dir, wanted, reference_quant)
    merged = merge(target, base_dir, emit, cfg.device)
    merged_dir = Path(merged.merged)
    predicted: dict[str, int] = {}
    for quant in [reference_quant, *wanted]:
        predicted[quant] = quants.predict(merged_dir, quant).bytes
        emit.log(f"{quant}: {quants.QUANTS[quant].description}; predicted {predicted[quant] / 2**20:.0f} MiB")
    emit.check_cancelled()

    tokenizer = templating.load_tokenizer(merged_dir)
    contract = _contract(tokenizer, target)
    staging = run_dir / f".gguf-staging-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    previous = _previous(target, merged, cfg)
    wanted += [q for q in previous if q != reference_quant and q not in wanted]  # earlier quants stay
    if cfg.lora_gguf:  # the base as a GGUF beside the adapter (the adapter itself is small)
        predicted["BASE"] = quants.predict(base_dir, reference_quant).bytes
    _check_disk(run_dir, {q: size for q, size in predicted.items() if q not in previous})
    staging.mkdir()
    try:
        produced = _produce(cfg, target, staging, merged, base_dir, name, reference_quant, wanted, previous, emit)
        emit.check_cancelled()
        verify_started = time.monotonic()
        carried = {q: report for q, (_path, report) in previous.items()}
        budget = pipeline_plan.gate_budget(planner.model_params(_config(merged_dir)), cfg.ppl_tokens)
        reports = _verify(staging, produced, merged_dir, tokenizer, contract, target, cfg, carried, emit,
                          budget.ppl_tokens)
        verify_seconds = round(time.monotonic() - verify_started, 1)
        checked = f"greedy parity on {MAX_PROMPTS} prompts of up to {gate.MAX_NEW} tokens; {budget.sentence()}"
        emit.log(f"the gate's budget: {checked}")
        result = _register(cfg, target, staging, produced, reports, contract, merged, name, base_dir, emit, checked)
    except OSError as exc:
        raise disk_error(exc, "exporting") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest_path = manifest.write(target)
    except OSError as exc:
        raise disk_error(exc, "writing the manifest") from exc
    emit.artifact(manifest_path, kind="manifest")
    return result.model_copy(update={"manifest": str(manifest_path), "verify_seconds": verify_seconds,
                                     "seconds": round(time.monotonic() - started, 1)})


def _check_memory(base_dir: Path, wanted: list[str], reference: str) -> None:
    """Refuse before the merge when a step of the export cannot fit in the memory available (the gate, which
    runs the 16-bit GGUF through llama.cpp, needs the most)."""
    from appliance import pipeline_plan as pp

    choices = pp.Choices(quants=wanted, reference=reference, import_kind="imported")
    machine = pp.Machine.here(base_dir)
    for need in pp.stages(_config(base_dir), choices, machine):
        if need.stage in ("merge", "convert", "quantize", "gate"):
            pp.check_memory(need.ram_mb, machine.ram_available_mb, f"the export's {need.stage} step ({need.detail})",
                            need.fix)


def _check_disk(run_dir: Path, sizes: dict[str, int]) -> None:
    """Refuse before the first GGUF is written when the predicted files do not fit on the store's disk."""
    need = sum(sizes.values()) + (64 << 20)
    free = disk_free_mb(run_dir) * (1 << 20)
    if free < need:
        files = ", ".join(f"{q} {size / 1e9:.2f} GB" for q, size in sizes.items())
        raise ExportError(f"the GGUF files need {need / 1e9:.2f} GB ({files}) and the store's disk has "
                          f"{free / 1e9:.2f} GB free", "Free space on the store's disk (df -h shows it), or export "
                          "fewer quantizations (--quant), and export again; no GGUF was written.")


def _contract(tokenizer: Any, run: Run) -> ChatContract:
    report = run.data_report()
    task = report.task if report is not None else "chat"
    labels = report.labels.set if report is not None and report.labels is not None else None
    system = templating.shared_system_prompt(row["messages"] for row in run.rows("train"))
    try:
        return templating.contract(tokenizer, system, task, labels)
    except ValueError as exc:
        raise ExportError(f"the trained model's tokenizer cannot be exported for chat: {exc}",
                          "Import a base model with a chat template (tokenizer_config.json or "
                          "chat_template.jinja) and train again.") from exc


# -- producing the files --------------------------------------------------------------------


def _previous(run: Run, merged: MergeResult, cfg: ExportConfig) -> dict[str, tuple[Path, FileReport]]:
    """Registered files of an earlier export of this same adapter and reference, by quant, with their
    reports: kept, and not made or verified again."""
    try:
        record = run.verification()
    except StoreError:
        return {}  # damaged: everything is made and verified again
    if record is None or (record.adapter_sha256, record.reference, record.ppl_tokens) != (
            merged.adapter_sha256, cfg.outtype.upper(), cfg.ppl_tokens):
        return {}
    files = {}
    for entry in record.files:
        path = run.gguf_dir / entry.file
        if entry.passed and entry.quant in quants.QUANTS and plain_name(entry.file) and path.is_file():
            files[entry.quant] = (path, entry)
    return files


def _produce(cfg: ExportConfig, run: Run, staging: Path, merged: MergeResult, base_dir: Path, name: str,
             reference_quant: str, wanted: list[str], previous: dict[str, tuple[Path, FileReport]],
             emit: Emitter) -> dict[str, tuple[Path, float]]:
    """Every GGUF of this export in `staging`, by quant, with the seconds each took."""
    produced: dict[str, tuple[Path, float]] = {}
    steps = [reference_quant, *wanted] + (["LORA"] if cfg.lora_gguf else [])
    for i, quant in enumerate(steps):
        emit.check_cancelled()
        target = staging / (f"{name}-lora-{reference_quant}.gguf" if quant == "LORA" else f"{name}-{quant}.gguf")
        if quant in previous:
            os.link(previous[quant][0], target)  # same bytes, already verified; a link costs nothing
            emit.log(f"{quant}: already exported and verified from this adapter; kept")
            produced[quant] = (target, 0.0)
            continue
        emit.progress(f"{'converting' if i == 0 or quant == 'LORA' else 'quantizing'} {quant}", i, len(steps))
        began = time.monotonic()
        faults.point("export.convert" if quant in (reference_quant, "LORA") else "export.quantize")
        if quant == reference_quant:
            toolchain.convert_to_gguf(Path(merged.merged), target, cfg.outtype, log=staging / ".convert.log",
                                      pre_tokenizer=cfg.pre_tokenizer)
        elif quant == "LORA":
            _lora(run, base_dir, staging, target, reference_quant, cfg, produced)
        else:
            toolchain.quantize(produced[reference_quant][0], target, quant)
        produced[quant] = (target, round(time.monotonic() - began, 2))
    return produced


def _lora(run: Run, base_dir: Path, staging: Path, target: Path, reference_quant: str, cfg: ExportConfig,
          produced: dict[str, tuple[Path, float]]) -> None:
    if is_full_model(run.adapter_dir):
        raise ExportError("this run trained every weight (method full); there is no adapter to export alone",
                          "Leave out --lora-gguf: the merged GGUF is the whole model.")
    toolchain.convert_lora(run.adapter_dir, base_dir, target, cfg.outtype, log=staging / ".convert-lora.log")
    base_gguf = staging / f"{base_dir.name}-{reference_quant}.gguf"
    began = time.monotonic()
    toolchain.convert_to_gguf(base_dir, base_gguf, cfg.outtype, log=staging / ".convert-base.log",
                              pre_tokenizer=cfg.pre_tokenizer)
    produced["BASE"] = (base_gguf, round(time.monotonic() - began, 2))


# -- the gate -------------------------------------------------------------------------------


def _verify(staging: Path, produced: dict[str, tuple[Path, float]], merged_dir: Path, tokenizer: Any,
            contract: ChatContract, run: Run, cfg: ExportConfig,
            carried: dict[str, FileReport], emit: Emitter, ppl_tokens: int) -> dict[str, FileReport]:
    reference_quant = cfg.outtype.upper()
    if all(q in carried for q in produced):
        return dict(carried)
    faults.point("export.verify")
    emit.progress(f"verification: {reference_quant}'s greedy answers, checked against the merged model", 0,
                  len(produced) + 1)
    rows = list(run.rows("val")) or list(run.rows("train"))[:16]
    prompts = [_prompt(r["messages"]) for r in rows[:MAX_PROMPTS - 1]] + [
        [{"role": "user", "content": "In one sentence, what is a computer?"}]]
    ppl_rows = gate.scored_rows(tokenizer, [r["messages"] for r in rows], ppl_tokens)
    emit.log(f"perplexity is measured on {len(ppl_rows)} of {len(rows)} validation rows "
             f"({sum(len(ids) for ids, _ in ppl_rows):,} tokens)")
    n_ctx = _context(tokenizer, prompts, ppl_rows, merged_dir)
    emit.log(f"llama.cpp runs the gate's files with {n_ctx} tokens of context: "
             f"{offload.for_gguf(produced[reference_quant][0], n_ctx).reason}")
    reference = gate.build_reference(produced[reference_quant][0], merged_dir, tokenizer, contract, prompts, ppl_rows,
                                     n_ctx)
    emit.log(f"greedy parity: {len(reference.continuations)} prompts, "
             f"{sum(len(g) for _p, g, _m in reference.continuations)} tokens of {reference_quant} fed to the merged "
             f"model (a module at a time, float32): {reference.merged_agreement:.1%} identical")
    architecture = _architecture(merged_dir)
    reports: dict[str, FileReport] = {}
    reference_ppl: float | None = None
    order = [q for q in produced if q not in ("LORA", "BASE")]
    for i, quant in enumerate(order, 1):
        emit.check_cancelled()
        emit.progress(f"verification: {quant}", i, len(produced) + 1)
        path = produced[quant][0]
        if quant in carried:
            reports[quant] = carried[quant]
            reference_ppl = carried[quant].ppl if quant == reference_quant else reference_ppl
            continue
        report = gate.verify_file(path, quant, reference, contract, architecture, reference.tensor_count, n_ctx,
                                  required_agreement=quant == reference_quant, reference_ppl=reference_ppl)
        if quant == reference_quant:
            reference_ppl = report.ppl
        reports[quant] = report
        _log_report(report, emit)
    if "LORA" in produced:
        emit.progress("verification: base + adapter", len(produced), len(produced) + 1)
        reports["LORA"] = gate.verify_lora(produced["LORA"][0], produced["BASE"][0], reference, contract.stop_ids,
                                           n_ctx)
        _log_report(reports["LORA"], emit)
    return reports


def _prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to its last assistant turn: what the model is asked to answer."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def _context(tokenizer: Any, prompts: list[list[dict[str, str]]], ppl_rows: list[tuple[list[int], list[bool]]],
             merged_dir: Path) -> int:
    longest = max([len(templating.prompt_ids(tokenizer, p)) + gate.MAX_NEW for p in prompts]
                  + [len(i) for i, _ in ppl_rows])
    limit = int(_config(merged_dir).get("max_position_embeddings") or 4096)
    return min(limit, max(512, longest + gate.STOP_BOUND + 8))


def _config(model_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return config


def _architecture(merged_dir: Path) -> str | None:
    return gguf_meta.expected_architecture(_config(merged_dir))


def _log_report(report: FileReport, emit: Emitter) -> None:
    for check in report.checks:
        if check.status != "pass":
            emit.log(f"{report.file}: {check.name}: {check.detail}", "warning" if check.status == "warn" else "error")
    if report.note:
        emit.log(report.note)


# -- registering ----------------------------------------------------------------------------


def _register(cfg: ExportConfig, run: Run, staging: Path, produced: dict[str, tuple[Path, float]],
              reports: dict[str, FileReport], contract: ChatContract, merged: MergeResult,
              name: str, base_dir: Path, emit: Emitter, budget: str) -> ExportResult:
    reference_quant = cfg.outtype.upper()
    reference_ok = reports[reference_quant].passed
    rejected = [q for q, r in reports.items() if not r.passed or not reference_ok]
    if "LORA" in rejected:
        rejected.append("BASE")
    final = run.gguf_dir
    rejected_dir = run.rejected_dir / time.strftime("%Y%m%d-%H%M%S") if rejected else None
    files = [_exported(q, produced[q], reports.get(q), merged,
                       rejected_dir if rejected_dir is not None and q in rejected else final) for q in produced]
    if rejected_dir is not None:
        _reject(run, rejected_dir, produced, reports, rejected)
    usable = [q for q in produced if q not in rejected]
    modelfile_path = None
    commands: dict[str, str] = {}
    model_quants = [q for q in usable if q in quants.QUANTS]
    if model_quants:
        served = quants.RECOMMENDED if quants.RECOMMENDED in model_quants else model_quants[-1]
        modelfile_path, commands = _write_serving_files(run, staging, contract, name, produced[served][0],
                                                        base_dir, Path(merged.merged), cfg.cluster_gpu_gib)
    run.write_verification(Verification(
        run=run.id, name=name, created=now_iso(), adapter_sha256=merged.adapter_sha256, reference=reference_quant,
        ppl_tokens=cfg.ppl_tokens, budget=budget, contract=contract, rejected=rejected,
        rejected_dir=str(rejected_dir) if rejected_dir else None,
        files=[reports[q] for q in usable if q in reports]), staging)
    if usable:
        faults.point("export.register")
        replace_dir(staging, final)
        for entry in files:
            if entry.passed:
                emit.artifact(Path(entry.path), kind="gguf")
    if rejected:
        emit.log(f"{len(rejected)} file(s) failed verification and were moved to {rejected_dir}", "error")
    return ExportResult(run=run.id, name=name, gguf_dir=str(final), merged=merged, files=files,
                        rejected=[q for q in rejected if q != "BASE"],
                        rejected_dir=str(rejected_dir) if rejected_dir else None,
                        modelfile=str(final / "Modelfile") if modelfile_path else None, commands=commands,
                        manifest="", verify_seconds=0.0, seconds=0.0, budget=budget)


def _exported(quant: str, made: tuple[Path, float], report: FileReport | None, merged: MergeResult,
              folder: Path) -> ExportedFile:
    path, seconds = made
    predicted = quants.predict(Path(merged.merged), quant).bytes if quant in quants.QUANTS else None
    return ExportedFile(file=path.name, path=str(folder / path.name), quant=quant, bytes=path.stat().st_size,
                        predicted_bytes=predicted, sha256=sha256_file(path), passed=report.passed if report else True,
                        agreement=report.agreement if report else None, ppl=report.ppl if report else None,
                        ppl_delta=report.ppl_delta if report else None, seconds=seconds,
                        note=report.note if report else None)


def _reject(run: Run, folder: Path, produced: dict[str, tuple[Path, float]],
            reports: dict[str, FileReport], rejected: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for quant in rejected:
        path = produced[quant][0]
        os.replace(path, folder / path.name)
    failed = [reports[q] for q in rejected if q in reports]
    run.write_verification(Verification(run=run.id, rejected=rejected, files=failed), folder)


def _write_serving_files(run: Run, staging: Path, contract: ChatContract, name: str,
                         served: Path, base_dir: Path, merged_dir: Path,
                         cluster_gpu_gib: float) -> tuple[Path, dict[str, str]]:
    """The Modelfile, chat template and README of llama.cpp serving, and the launch scripts of vLLM and TGI for
    the merged model (written in `staging`, which becomes the gguf folder)."""
    num_ctx = min(int(_config(base_dir).get("max_position_embeddings") or 4096), 4096)
    final = run.gguf_dir
    template = staging / "chat_template.jinja"
    template.write_text(contract.template, encoding="utf-8")
    path = staging / "Modelfile"
    atomic_write_text(path, runtime_files.modelfile(contract, served.name, num_ctx))
    commands = runtime_files.serve_commands(run.id, final / served.name, final / template.name, num_ctx, name)
    plan = cluster.plan_for(merged_dir, cluster_gpu_gib)
    scripts = {"vllm": cluster.vllm_script(merged_dir, final / template.name, name, plan),
               "tgi": cluster.tgi_script(merged_dir, name, plan)}
    for engine, text in scripts.items():
        atomic_write_text(staging / f"{engine}.sh", text)
        os.chmod(staging / f"{engine}.sh", 0o755)
        commands[engine] = f"sh {final / engine}.sh"
    atomic_write_text(staging / "README.md", _readme(name, commands, served.name) + cluster.readme_section(plan))
    return path, commands


def _readme(name: str, commands: dict[str, str], served: str) -> str:
    return (f"# {name}\n\nEvery .gguf file here passed the verification gate (verification.json says how).\n"
            f"The Modelfile and the commands below serve {served} with the chat template and stop tokens the "
            "model was trained with.\n\n"
            f"    {commands['appliance']}\n    {commands['llama-server']}\n    {commands['ollama']}\n")

