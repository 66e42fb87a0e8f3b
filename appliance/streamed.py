"""A Hugging Face model run from its safetensors files one module at a time, in float32, without ever
holding the whole model: the way to ask a 16 GB model for its logits on a machine that cannot hold its
32 GB float32 copy, or should not hold its 16 GB 16-bit one beside a GGUF.

The model's skeleton is built with its parameters on the meta device (buffers such as rotary
frequencies are real and small). Before each module runs, a hook reads that module's own tensors from
the shards and casts them to float32; after it runs, they are dropped. Peak memory is the largest
module's float32 weights (the embedding or the output head) plus the activations, whatever the model's
size. Every sequence runs in one batch, padded on the right (a causal model never looks ahead), so the
shards are read once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import tensorfile
from appliance.errors import ApplianceError


class StreamedModelError(ApplianceError):
    title = "Cannot run the model"


@dataclass
class Top2:
    """The model's choice at each scored position of one sequence, and how clear it was."""

    tokens: list[int]  # the most likely next token at each position
    margins: list[float]  # its logit minus the runner-up's


def top2(model_dir: Path, sequences: list[list[int]], starts: list[int]) -> list[Top2]:
    """For each sequence, the model's most likely next token at positions `start - 1 ..` to its second last
    token (what it would write after each prefix from `start` on), with the margin over the runner-up."""
    import torch

    if not sequences:
        return []
    model, head, softcap = _skeleton(model_dir)
    decoder = model.get_decoder()
    width = max(len(s) for s in sequences)
    batch = torch.tensor([s + [s[-1]] * (width - len(s)) for s in sequences])
    with _streaming(model, model_dir), torch.no_grad():
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
        rows = [hidden[i, start - 1: len(s) - 1] for i, (s, start) in enumerate(zip(sequences, starts, strict=True))]
        logits = head(torch.cat(rows)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    best = torch.topk(logits, 2, dim=-1)
    out, at = [], 0
    for row in rows:
        n = row.shape[0]
        out.append(Top2(tokens=best.indices[at:at + n, 0].tolist(),
                        margins=(best.values[at:at + n, 0] - best.values[at:at + n, 1]).tolist()))
        at += n
    return out


def _skeleton(model_dir: Path) -> tuple[Any, Any, float | None]:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "logit_scale", None):
        raise StreamedModelError(f"{model_dir.name}: a model that scales its logits is not supported here",
                                 "Export it with a GPU or enough memory for its 16-bit copy.")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied output head shares the embedding's parameter, and so its source tensor
    model.eval()
    softcap = getattr(config, "final_logit_softcapping", None)
    return model, model.get_output_embeddings(), float(softcap) if softcap else None


class _streaming:
    """Hooks that give each module its float32 weights for the length of its own forward."""

    def __init__(self, model: Any, model_dir: Path) -> None:
        self.readers: dict[str, tensorfile.Reader] = {}
        self.where: dict[str, tensorfile.Reader] = {}
        for shard in tensorfile.shards(model_dir):
            reader = tensorfile.Reader(shard)
            self.readers[shard.name] = reader
            self.where.update(dict.fromkeys(reader.tensors, reader))
        stored = {id(p): name for name, p in model.named_parameters(remove_duplicate=False) if name in self.where}
        self.sources: dict[Any, list[tuple[str, str, Any]]] = {}
        for prefix, module in model.named_modules():
            own = []
            for name, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                source = full if full in self.where else stored.get(id(param))  # a tied weight: its source
                if source is None:
                    self.close()
                    raise StreamedModelError(f"{model_dir.name} has no tensor {full}",
                                             "The model folder is incomplete or of another architecture: "
                                             "export it again.")
                own.append((name, source, param))
            if own:
                self.sources[module] = own
        self.hooks: list[Any] = []

    def __enter__(self) -> _streaming:
        for module in self.sources:
            self.hooks.append(module.register_forward_pre_hook(self._load))
            self.hooks.append(module.register_forward_hook(self._drop))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self.hooks:
            hook.remove()
        for module, own in self.sources.items():
            for name, _source, meta in own:
                module._parameters[name] = meta
        self.close()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def _load(self, module: Any, _args: Any) -> None:
        import torch

        for name, source, meta in self.sources[module]:
            tensor = self.where[source].read(source).to(torch.float32)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise StreamedModelError(f"tensor {source} has shape {tuple(tensor.shape)}, the model's config "
                                         f"expects {tuple(meta.shape)}", "Export the model again.")
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)

    def _drop(self, module: Any, _args: Any, _output: Any) -> None:
        for name, _source, meta in self.sources[module]:
            module._parameters[name] = meta
