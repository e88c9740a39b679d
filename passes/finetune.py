"""Training inside passes: fine-tuning the IR's own weights through the differentiable torch
executor, with weight transforms (pruning masks, straight-through binarization) held by the
executor and optional distillation from the uncompressed graph.

`TrainingOptions` are the options every training pass shares; `train` runs the loop;
`prune` drives one-shot or gradual (cubic-schedule) structured pruning for any mask rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tcc.ir.errors import TccError
from tcc.ir.graph import Graph, freeze_weights

from .base import PassContext, option
from .data import Dataset, batch_size_of, first_output


@dataclass(frozen=True)
class TrainingOptions:
    """Options shared by the passes that fine-tune when training data is given."""

    epochs: int = option(10, "fine-tuning epochs when training data is given (0: never train)", within="[0, inf)")
    lr: float = option(2e-3, "fine-tuning learning rate (AdamW)", within="(0, 1]")
    distill: bool = option(True, "distil from the uncompressed model (KL on the logits) besides the labels")
    temperature: float = option(2.0, "distillation temperature", within="[0.1, 100]")
    hidden: float = option(0.0, "with distill: weight of distilling hidden states too (the MSE of every layer "
                                "norm's output and attention map to the uncompressed model's, relative to its "
                                "mean square)", within="[0, 100]")


class Mask(nn.Module):
    """Weight transform `w -> w * mask`; the mask is a buffer that pruning steps replace."""

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.register_buffer("mask", torch.from_numpy(np.asarray(mask, dtype=np.float32)))

    def set(self, mask: np.ndarray) -> None:
        self.mask.copy_(torch.from_numpy(np.asarray(mask, dtype=np.float32)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def training_data(ctx: PassContext, graph: Graph, options: TrainingOptions) -> Dataset | None:
    """The training set when the pass should train (data given and epochs > 0), checked to fit."""
    _, data = ctx.dataset("train")
    if data is None or options.epochs == 0:
        return None
    data = data.fit(graph, "training data")
    if data.labels is None and not options.distill:
        raise TccError(f"{data.source}: training data has no labels and distillation is off: nothing to learn from")
    return data


def train(graph: Graph, ctx: PassContext, options: TrainingOptions, data: Dataset, *, desc: str,
          weight_transforms: dict[str, nn.Module] | None = None,
          activation_transforms: dict[str, nn.Module] | None = None, teacher: Graph | None = None,
          on_step: Callable[[int, int, nn.Module], None] | None = None) -> nn.Module:
    """Fine-tune all float weights of `graph` (and the transforms' parameters) on `data`:
    the task's loss on the labels of the first output (`Task.loss`: cross-entropy, CTC), plus
    KL distillation from `teacher` (per example, or per frame or token) when
    `options.distill`, and with `options.hidden` the hidden states' distillation (`hidden_states`:
    the values both graphs compute under one name, of layer norms and softmaxes).
    `on_step(step, total, module)` runs before each step (pruning schedules update masks
    there). Weights pruned before (a sparsity structure in their type) and without a transform
    of their own keep their zeros (a fixed mask). Returns the trained torch executor."""
    factory = ctx.require_torch(desc)
    distilling = options.distill and teacher is not None
    hidden = hidden_states(graph, teacher) if distilling and options.hidden else []
    taken: dict[str, list[torch.Tensor]] = {}  # this batch's hidden states, by (side, value): one a run

    def run(executor: nn.Module) -> Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]]:
        return lambda xs: executor(*(x.to(ctx.device) for x in xs))

    transforms = dict(activation_transforms or {})
    for name in hidden:
        record = _Record(taken, f"student {name}")
        transforms[name] = nn.Sequential(transforms[name], record) if name in transforms else record
    kept = {n: Mask(np.asarray(graph.weights[n]) != 0) for n, t in graph.constants
            if t.dtype.is_float and t.sparsity is not None and n not in (weight_transforms or {})}
    module = factory(graph, ctx.device, trainable=True, weight_transforms=kept | dict(weight_transforms or {}),
                     activation_transforms=transforms)
    teacher_module = factory(teacher, ctx.device, activation_transforms={
        name: _Record(taken, f"teacher {name}") for name in hidden}) if distilling else None
    if hidden:
        ctx.note(f"distilling {len(hidden)} hidden states: {', '.join(hidden[:3])}{', ...' if len(hidden) > 3 else ''}")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    batch = batch_size_of(graph)
    total = options.epochs * data.num_batches(batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    generator = torch.Generator().manual_seed(ctx.seed)
    step = 0
    module.train()
    with ctx.progress_bar(total=total, desc=desc) as bar:
        for _ in range(options.epochs):
            for b in data.batches(batch, shuffle=True, generator=generator):
                if on_step is not None:
                    on_step(step, total, module)
                taken.clear()
                logits = first_output(graph, b.inputs, run(module))[:b.valid]
                loss = logits.new_zeros(())
                if b.labels is not None:
                    labels = b.labels[:b.valid]
                    loss = loss + data.task.loss(logits, labels.to(ctx.device) if torch.is_tensor(labels) else labels)
                if teacher_module is not None:
                    with torch.no_grad():
                        target = first_output(teacher, b.inputs, run(teacher_module))[:b.valid]
                    t, symbols = options.temperature, logits.shape[-1]
                    loss = loss + t * t * F.kl_div(F.log_softmax(logits.reshape(-1, symbols) / t, -1),
                                                   F.log_softmax(target.reshape(-1, symbols) / t, -1),
                                                   log_target=True, reduction="batchmean")
                    if hidden:
                        loss = loss + options.hidden * sum(_relative_mse(taken[f"student {n}"], taken[f"teacher {n}"])
                                                           for n in hidden) / len(hidden)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    module.eval()
    return module


HIDDEN_KINDS = frozenset({"layer_norm", "rms_norm", "softmax"})


def hidden_states(student: Graph, teacher: Graph) -> list[str]:
    """The hidden states to distil: the results of the teacher's layer norms and softmaxes
    (attention maps) that the student computes under the same name, shape and float dtype."""
    types = student.types
    return [op.result for op in teacher.ops if op.kind in HIDDEN_KINDS and op.result in types
            and types[op.result].shape == op.type.shape and types[op.result].dtype.is_float]


class _Record(nn.Module):
    """Identity that keeps the value (with its graph) in `store[key]` for this batch's loss:
    one a run (a decoder's step runs along the sequence)."""

    def __init__(self, store: dict[str, list[torch.Tensor]], key: str):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        self.store.setdefault(self.key, []).append(v)
        return v


def _relative_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The mean square error of a hidden state over its mean square in the teacher, over every run."""
    s, t = torch.cat([v.flatten() for v in student]), torch.cat([v.flatten() for v in teacher])
    return F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-8)


def trained_weights(module: nn.Module, graph: Graph, *, transformed: bool = True) -> dict[str, np.ndarray]:
    """The float constants of a trained executor as numpy: with their transforms applied
    (what the graph computes with), or the latent values the optimizer updated."""
    read = module.effective_constant if transformed else module.constant
    out = {}
    with torch.no_grad():
        for name, t in graph.constants:
            if t.dtype.is_float:
                out[name] = read(name).detach().cpu().numpy().astype(t.dtype.numpy)
    return out


def cubic_progress(step: int, total: int) -> float:
    """Zhu & Gupta's gradual-pruning schedule: the fraction of the final sparsity at `step`."""
    return 1.0 - (1.0 - min(step, total) / total) ** 3


MaskRule = Callable[[dict[str, np.ndarray], float], dict[str, np.ndarray]]


def prune(graph: Graph, ctx: PassContext, options: TrainingOptions, weights: list[str], rule: MaskRule, *,
          desc: str) -> dict[str, np.ndarray]:
    """Prune `weights` of `graph` with `rule(current weights, progress) -> masks` (progress in
    (0, 1], 1 = final sparsity). One-shot without training data; with it, gradual: masks
    follow a cubic schedule over the first two thirds of fine-tuning (ten updates), then
    fine-tuning goes on with the final masks. Returns the new values of the pruned weights
    (of every float weight when it trained)."""
    data = training_data(ctx, graph, options)
    current = {name: np.asarray(graph.weights[name]) for name in weights}
    if data is None:
        masks = rule(current, 1.0)
        ctx.note("one-shot (no training data)")
        out = {name: np.where(masks[name], current[name], 0).astype(current[name].dtype) for name in weights}
        return out
    transforms = {name: Mask(np.ones_like(current[name])) for name in weights}

    def on_step(step: int, total: int, module: nn.Module) -> None:
        horizon = max(1, (2 * total) // 3)
        every = max(1, horizon // 10)
        if step % every or step > horizon:
            return
        with torch.no_grad():
            live = {n: module.effective_constant(n).detach().cpu().numpy() for n in weights}
        for name, mask in rule(live, cubic_progress(step + every, horizon)).items():
            transforms[name].set(mask)  # the executor holds these very modules

    trained = train(graph, ctx, options, data, desc=desc, weight_transforms=transforms, teacher=graph,
                    on_step=on_step)
    result = trained_weights(trained, graph)
    final = rule({n: result[n] for n in weights}, 1.0)  # exact structure, even if the last update came early
    for name in weights:
        result[name] = np.where(final[name], result[name], 0).astype(result[name].dtype)
    ctx.note(f"gradual pruning with fine-tuning on {data.source} ({len(data)} examples, {options.epochs} epochs"
             f"{', distilled' if options.distill else ''})")
    return result


def with_weights(graph: Graph, weights: dict[str, np.ndarray], types: dict | None = None) -> Graph:
    """`graph` with new weight values (and optionally new constant types) for some constants."""
    types = types or {}
    constants = tuple((n, types.get(n, t)) for n, t in graph.constants)
    merged = dict(graph.weights)
    merged.update(freeze_weights(weights))
    return graph.replace(constants=constants, weights=merged)
