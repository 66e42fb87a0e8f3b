"""The training stage: `appliance train` as a job.

A plain, inspectable loop: AdamW over the trainable parameters, warmup then decay, gradient
accumulation with token-weighted loss (every answer token counts the same however batches are
cut), validation loss at intervals, early stopping, atomic checkpoints, and a stop at the next
step boundary on SIGTERM that saves first. Resuming reloads weights, optimizer, scheduler, RNG
and the position in the epoch, so the loss curve continues instead of restarting.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import faults, pipeline_plan, planner
from appliance.config import TrainConfig
from appliance.errors import ApplianceError, Cancelled
from appliance.events import Emitter
from appliance.fsutil import fsync_dir, replace_dir, sha256_file
from appliance.modeling import IGNORE
from appliance.records import TrainResult
from appliance.run import Run
from appliance.store import Store
from appliance.templating import load_tokenizer
from appliance.train import checkpoint, distributed
from appliance.train.checkpoint import TrainerState
from appliance.train.data import Encoded, collate, epoch_batches, load_split
from appliance.train.distributed import Group
from appliance.train.model import choose_backend, load_model, load_weights
from appliance.train.probe import LabelProbe


class TrainError(ApplianceError):
    title = "Training problem"


@dataclass
class _Session:
    """What the step loop works with, set up by `run`."""

    cfg: TrainConfig
    run: Run
    emit: Emitter
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]
    train_rows: list[Encoded]
    val_rows: list[Encoded]
    pad_id: int
    total_steps: int
    backend: str
    dtype: str
    resumed_from: int | None
    started: float
    group: Group  # the processes training together (one, unless --processes/--nodes)
    forward: Any  # micro-batch -> per-row answer loss, through DDP/FSDP when distributed
    probe: Any = None  # the task metric on validation rows (classification runs)


def run(cfg: TrainConfig, run_dir: Path, emit: Emitter) -> TrainResult:
    import torch

    started = time.monotonic()
    store = Store.open(cfg.store)
    target = Run(store, run_dir)
    model_dir = store.model_dir(target.base_model(cfg.base_model))
    if not target.split_path("train").is_file():
        raise TrainError(f"run {target.id} has no prepared data", f"Run `appliance data prepare FILES --run "
                         f"{target.id}` first.")
    torch.manual_seed(cfg.seed)
    backend = choose_backend(cfg, emit)  # before transformers loads: Unsloth patches it on import
    if distributed.wanted(cfg) and not distributed.in_rank():
        return TrainResult.model_validate(distributed.launch(cfg, run_dir, model_dir, emit))
    group = Group.start(cfg)
    try:
        return _run(cfg, target, emit, model_dir, backend, group, started)
    finally:
        group.end()


def _run(cfg: TrainConfig, run: Run, emit: Emitter, model_dir: Path, backend: str, group: Group,
         started: float) -> TrainResult:
    import torch

    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    emit.progress("tokenizing the prepared data", 0)
    train_rows, truncated = load_split(run.split_path("train"), tokenizer, cfg.max_seq_len)
    val_rows, _ = load_split(run.split_path("val"), tokenizer, cfg.max_seq_len)
    if not train_rows:
        raise TrainError("the training split has no row with an answer to learn",
                         f"Check the prepared data ({run.split_path('train')}) and --max-seq-len.")
    if truncated:
        emit.log(f"{truncated} training rows were truncated to {cfg.max_seq_len} tokens", "warning")
    train_rows = train_rows + _mixed_rows(cfg, run.store, tokenizer, len(train_rows), emit)
    group.same_everywhere(f"{sha256_file(run.split_path('train'))} {len(train_rows)} {len(val_rows)}",
                          "training data")
    batches_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / (cfg.grad_accum * group.world))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))

    longest = max(len(r.input_ids) for r in train_rows)
    answer_share = max(sum(label != IGNORE for label in r.labels) / len(r.labels) for r in train_rows)
    memory_plan = _check_plan(cfg, run, model_dir, longest, answer_share, emit, group, backend)
    emit.progress("loading the base model", 0, total_steps)
    model, dtype = load_model(cfg, model_dir, backend, group.device)
    state = TrainerState(total_steps=total_steps)
    if cfg.init_from and not cfg.resume:
        _init_from(cfg, run.store, model)
        emit.log(f"starting from the trained weights of run {cfg.init_from}")
    resumed_from = None
    last = checkpoint.latest(run.path) if cfg.resume else None
    if cfg.resume and last is None:
        emit.log("no complete checkpoint to resume from: starting from the beginning", "warning")
    if last is not None:
        load_weights(model, last / "model", cfg.method)  # before the weights are wrapped (and sharded)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    forward, optimizer = group.wrap(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # sharded ones, under FSDP
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(total_steps * cfg.warmup_ratio),
                              num_training_steps=total_steps)
    if last is not None:
        checkpoint.load_optimizer(last, optimizer, scheduler, group)
        state = checkpoint.load_state(last)
        resumed_from = state.step
        processes = state.processes
        changed = f" (it was trained on {processes} process(es), this run uses {group.world})" \
            if processes != group.world else ""
        emit.log(f"resumed from checkpoint step {resumed_from}{changed}")
    state.processes = group.world
    emit.log(f"training {sum(p.numel() for p in params):,} parameters ({backend}, {cfg.method}, {dtype}) for "
             f"{total_steps} steps on {len(train_rows)} rows, {len(val_rows)} validation rows")

    try:
        probe = LabelProbe.from_run(run, tokenizer, cfg.task_eval_items) if cfg.task_eval_items else None
        if probe is not None and group.sharding == "fsdp" and group.world > 1:
            emit.log("the label accuracy is not measured during sharded (FSDP) training: `appliance eval` measures "
                     "it on the saved adapter", "warning")
            probe = None
        session = _Session(cfg, run, emit, model, tokenizer, optimizer, scheduler, params, train_rows, val_rows,
                           pad_id, total_steps, backend, dtype, resumed_from, started, group, forward, probe)
        return _train(session, state)
    except MemoryError as exc:
        raise _out_of_memory(cfg, memory_plan, state.step) from exc
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(exc).lower():
            raise
        raise _out_of_memory(cfg, memory_plan, state.step) from exc


def _train(s: _Session, state: TrainerState) -> TrainResult:
    """The step loop, the final evaluation and the saved adapter. With several processes every rank runs
    it in step: the decisions that depend on one rank's clock or probe (time budget, early stopping on the
    task metric, a cancel) are taken together at each step boundary."""
    device = s.group.device or next(s.model.parameters()).device
    s.model.train()
    window_tokens, window_start = 0, time.monotonic()
    seconds_before = state.seconds
    session_start = time.monotonic()
    saved_at = state.step
    stop_reason = None
    while state.step < s.total_steps and stop_reason is None:
        batches = epoch_batches(s.train_rows, s.cfg.batch_size, s.cfg.seed, state.epoch,
                                s.cfg.batching == "length_grouped")
        while state.batch < len(batches) and state.step < s.total_steps:
            micro = [collate([s.train_rows[i] for i in b], s.pad_id) for b in
                     batches[state.batch:state.batch + s.cfg.grad_accum * s.group.world]]
            loss, tokens = _optimizer_step(s, micro, device)
            faults.point("train.step")
            state.step += 1
            state.batch += len(micro)
            state.real_tokens += tokens
            state.losses.append((state.step, round(loss, 5)))
            window_tokens += tokens
            now = time.monotonic()
            state.seconds = seconds_before + now - session_start
            rate = window_tokens / max(1e-6, now - window_start)
            per_step = (now - session_start) / max(1, state.step - (s.resumed_from or 0))
            s.emit.progress("training", state.step, s.total_steps, loss=loss, lr=s.scheduler.get_last_lr()[0],
                            tokens_per_s=round(rate, 1), eta_s=round(per_step * (s.total_steps - state.step), 1),
                            mem_mb=_peak_mb(device))
            if now - window_start > 30:
                window_tokens, window_start = 0, now
            if s.cfg.max_minutes is not None and stop_reason is None and s.group.main:
                stop_reason = _budget(s, state, now - session_start)
            if s.val_rows and (state.step % s.cfg.eval_every == 0 or state.step == s.total_steps):
                stop_reason = _evaluate(s, device, state) or stop_reason
            # one decision for every rank: the main process's clock and probe, anyone's cancel
            stop_all, cancel_all, steps_all = s.group.max([float(bool(stop_reason) and s.group.main),
                                                           float(s.emit.cancelled()),
                                                           float(s.total_steps if s.group.main else 0)])
            if int(steps_all) != s.total_steps:
                _refit(s, state, int(steps_all))  # the main process fitted the steps to the time budget
            if stop_all and not stop_reason:
                stop_reason = "stopped with the main process"
            if state.step % s.cfg.save_every == 0:
                _save(s, state)
                saved_at = state.step
            if cancel_all and state.step < s.total_steps:
                if saved_at != state.step:
                    _save(s, state)
                raise Cancelled(f"training stopped at step {state.step} of {s.total_steps}; a checkpoint is saved",
                                f"Continue with `appliance train --resume {s.run.id}`.")
            if stop_reason:
                break
        if state.batch >= len(batches):
            state.epoch += 1
            state.batch = 0
    if s.val_rows and (not state.evals or state.evals[-1][0] != state.step):
        _evaluate(s, device, state)
    if stop_reason:
        s.emit.log(stop_reason)
    adapter_dir = s.run.adapter_dir
    weights = adapter_dir / ("model.safetensors" if s.cfg.method == "full" else "adapter_model.safetensors")
    digest = ""
    if s.group.saves:
        _save_final(s.model, s.tokenizer, s.run, checkpoint.full_weights(s.model, s.group))
        digest = s.emit.artifact(weights, kind="adapter" if s.cfg.method != "full" else "model")
    else:
        checkpoint.full_weights(s.model, s.group)  # the gathering of shards takes every rank
    s.group.barrier()
    evals = state.evals
    return TrainResult(adapter=str(adapter_dir), sha256=digest, backend=s.backend, method=s.cfg.method,
                       steps=state.step, train_loss=state.losses[-1][1],
                       eval_loss=evals[-1][1] if evals else None, real_tokens=state.real_tokens,
                       train_seconds=round(state.seconds, 2), peak_mem_mb=_peak_mb(device),
                       seconds=round(time.monotonic() - s.started, 2), resumed_from=s.resumed_from)


FIT_AFTER = 4  # steps measured before a time budget decides how many steps fit


def _budget(s: _Session, state: TrainerState, elapsed: float) -> str | None:
    """Fit the steps (and the learning-rate schedule) to the time budget once the first steps are measured,
    and again after each evaluation or checkpoint (their cost then counts in the time a step takes); say why
    training stops when the next step would overrun the budget. With several processes the main one decides
    by its clock, and the others follow it at the step's end."""
    budget = (s.cfg.max_minutes or 0) * 60
    done = state.step - (s.resumed_from or 0)
    per_step = elapsed / max(1, done)
    after_pause = done > FIT_AFTER and any((state.step - 1) % every == 0 for every in (s.cfg.eval_every,
                                                                                          s.cfg.save_every))
    if s.resumed_from is None and (done == FIT_AFTER or after_pause):
        fit = max(state.step, state.step + int((budget - elapsed) / per_step))
        if fit < s.total_steps:
            _refit(s, state, fit)
            s.emit.log(f"about {fit} steps fit in {_minutes(s.cfg.max_minutes)} at {per_step:.1f} s a step: "
                       f"training {fit} steps, with the learning-rate schedule fitted to them")
        return None
    if elapsed + per_step > budget and state.step < s.total_steps:
        return (f"the time budget of {_minutes(s.cfg.max_minutes)} is spent: stopped at step {state.step} of "
                f"{s.total_steps}")
    return None


def _refit(s: _Session, state: TrainerState, steps: int) -> None:
    from transformers import get_scheduler

    s.total_steps = steps
    s.scheduler = get_scheduler(s.cfg.scheduler, s.optimizer, num_training_steps=steps,
                                num_warmup_steps=int(steps * s.cfg.warmup_ratio))
    with warnings.catch_warnings():  # "scheduler stepped before the optimizer": it is catching up
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state.step):
            s.scheduler.step()  # to where this run already is


def _minutes(value: float | None) -> str:
    return f"{value:g} minute{'' if value == 1 else 's'}"


def _mixed_rows(cfg: TrainConfig, store: Store, tokenizer: Any, own: int, emit: Emitter) -> list[Encoded]:
    """Rows of other runs' training splits, drawn in proportion to their weights (multi-task)."""
    import random

    mixed: list[Encoded] = []
    rng = random.Random(cfg.seed)
    for run_id, weight in sorted(cfg.mix.items()):
        rows, _ = load_split(store.run(run_id).split_path("train"), tokenizer, cfg.max_seq_len)
        if not rows:
            raise TrainError(f"run {run_id} named in mix has no prepared training data",
                             f"Prepare it first: appliance data prepare FILES --run {run_id}.")
        wanted = max(1, round(weight * own))
        picked = rng.sample(rows, wanted) if wanted <= len(rows) else [rng.choice(rows) for _ in range(wanted)]
        mixed.extend(picked)
        emit.log(f"mixing in {wanted} rows from run {run_id} (weight {weight})")
    return mixed


def _init_from(cfg: TrainConfig, store: Store, model: Any) -> None:
    """Load a previous run's trained weights (sequential fine-tuning); the shapes must agree."""
    folder = store.run(cfg.init_from or "").adapter_dir
    if not folder.is_dir():
        raise TrainError(f"run {cfg.init_from} has no trained adapter", "Train it first, or leave out --init-from.")
    if cfg.method != "full":
        saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if saved.get("r") != cfg.rank:
            raise TrainError(f"run {cfg.init_from} trained rank {saved.get('r')} adapters, this run asks for rank "
                             f"{cfg.rank}", f"Use --rank {saved.get('r')} to continue from it.")
    load_weights(model, folder, cfg.method)


def _check_plan(cfg: TrainConfig, run: Run, model_dir: Path, longest: int, answer_share: float, emit: Emitter,
                group: Group, backend: str) -> planner.Plan:
    """Predict peak memory and refuse a run that cannot fit, naming the nearest setting that does. With several
    processes the plan is per device; on a CPU the processes of a machine share its memory."""
    import torch

    # torch reports the free memory after this process's own CUDA context, which the plan counts
    gpu_free = (torch.cuda.mem_get_info(group.local_rank)[0] / 2**20 + planner.CUDA_CONTEXT_MB
                if torch.cuda.is_available() else None)
    device, available = planner.device_memory(cfg.processes, gpu_free)
    parameters = run.store.get_model(model_dir.name).parameters
    predicted = planner.check(cfg, model_dir, parameters, longest, device, available, answer_share, backend)
    pipeline_plan.check_disk(predicted.disk_mb, run.path, f"training {run.id} (its checkpoints and adapter)",
                             "keep fewer checkpoints (keep_checkpoints in the recipe)")
    emit.log(f"memory plan: {planner.summary(predicted)}, {predicted.disk_mb / 1024:.1f} GiB of disk")
    emit.metric("planned_peak_mb", predicted.peak_mb)
    return predicted


def _out_of_memory(cfg: TrainConfig, memory_plan: Any, step: int) -> TrainError:
    return TrainError(f"ran out of memory at step {step} (planned peak {memory_plan.peak_mb / 1024:.1f} GiB)",
                      "Lower --batch-size (raise grad_accum to keep the effective batch), lower --max-seq-len, "
                      "or enable gradient_checkpointing in the recipe; the last checkpoint is kept for --resume.")


def _optimizer_step(s: _Session, micro: list[dict[str, Any]], device: Any) -> tuple[float, int]:
    """One optimizer step over the step's micro-batches, token-weighted: every answer token of the step
    counts the same, however the rows are cut into micro-batches and shared among the ranks."""
    counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro]
    total = max(1, sum(counts))
    mine = s.group.share(list(range(len(micro))))
    loss_sum = 0.0
    tokens = 0
    for turn, index in enumerate(mine):
        batch = {k: v.to(device) for k, v in micro[0 if index is None else index].items()}
        # the all-reduce takes the mean over ranks, hence `world`; a turn without rows of its own counts nothing
        scale = 0.0 if index is None else s.group.world / total
        with s.group.no_sync(last=turn == len(mine) - 1):
            summed = s.forward(batch).sum()
            (summed * scale).backward()
        if index is not None:
            loss_sum += float(summed.detach())
            tokens += int(batch["attention_mask"].sum())
    loss_sum, step_tokens = s.group.sum([loss_sum, float(tokens)])
    s.group.clip(s.params, 1.0)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return loss_sum / total, int(step_tokens)


def _evaluate(s: _Session, device: Any, state: TrainerState) -> str | None:
    """Validation loss over all validation rows (shared among the ranks), the task metric when asked,
    and early stopping."""
    import torch

    cfg, emit = s.cfg, s.emit
    starts = list(range(0, len(s.val_rows), cfg.batch_size))
    s.model.eval()
    loss_sum, count_sum = 0.0, 0
    with torch.no_grad():
        for start in s.group.share(starts):
            first = 0 if start is None else start
            batch = {k: v.to(device) for k, v in collate(s.val_rows[first:first + cfg.batch_size], s.pad_id).items()}
            summed = float(s.forward(batch).sum())  # every rank takes as many turns (FSDP gathers in each)
            if start is not None:
                loss_sum += summed
                count_sum += int((batch["labels"][:, 1:] != IGNORE).sum())
        accuracy = s.probe.accuracy(s.model) if s.probe is not None and s.group.main else None
    s.model.train()
    loss_total, count_total = s.group.sum([loss_sum, float(count_sum)])
    value = loss_total / max(1.0, count_total)
    state.evals.append((state.step, round(value, 5)))
    emit.metric("eval_loss", value, step=state.step)
    if accuracy is not None:
        emit.metric("eval_accuracy", accuracy, step=state.step)
        state.task_evals.append((state.step, round(accuracy, 4)))
        if cfg.early_stopping_metric == "task":
            value = -accuracy  # the best evaluation is the lowest value
    elif cfg.early_stopping_metric == "task" and s.probe is not None:
        return None  # another rank: the main process decides on the task metric, and says so at the step's end
    best = state.best_eval
    if best is None or value < best:
        state.best_eval, state.bad_evals = value, 0
        return None
    state.bad_evals += 1
    patience = cfg.early_stopping_patience
    if patience is not None and state.bad_evals >= patience:
        watched = "validation accuracy" if cfg.early_stopping_metric == "task" and accuracy is not None \
            else "validation loss"
        return f"early stopping at step {state.step}: {watched} has not improved for {patience} evaluations"
    return None


def _save(s: _Session, state: TrainerState) -> None:
    faults.point("train.checkpoint")
    folder = checkpoint.save(s.run.path, state.step, s.model, s.optimizer, s.scheduler, state,
                             s.cfg.keep_checkpoints, s.group)
    if folder is not None:
        weights = next((folder / "model").glob("*.safetensors"))
        s.emit.artifact(weights, kind="checkpoint")


def _save_final(model: Any, tokenizer: Any, run: Run, weights: dict[str, Any] | None = None) -> Path:
    """The adapter (or full model) with the tokenizer, put into place when complete. `weights`: the whole
    state dict when the model's own is sharded (FSDP)."""
    tmp = run.path / f".adapter-{uuid.uuid4().hex[:6]}"
    try:
        faults.point("train.adapter")
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(str(tmp))
        fsync_dir(tmp)
        faults.point("train.adapter.register")
        replace_dir(tmp, run.adapter_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run.adapter_dir


def _peak_mb(device: Any) -> float:
    """The job's peak memory where it trains: on a GPU what torch's caching allocator reserved at most (what
    the card lent it, which the plan predicts less the CUDA context), else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return round(float(torch.cuda.max_memory_reserved(device)) / 2**20, 1)
    from appliance.hardware import peak_rss_mb

    return peak_rss_mb()

