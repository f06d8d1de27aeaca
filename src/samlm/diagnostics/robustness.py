"""Robustness of a trained model: what flatness is claimed to buy (Watts et al., ICML 2026).

Three measures, each of a model's mean loss ``L(W) = evaluate(model)`` on fixed validation
batches (the caller's ``evaluate``; the harness passes the run's own token-weighted validation
loss, eval mode, fp32):

* :func:`weight_noise`: for each σ of a list and each of K seeded draws k,

      W_t ← W_t + σ · rms(W_t) · z_{t,k},   rms(W) = sqrt(mean(W²)),   z ~ N(0, I)

  for every parameter tensor t (tied tensors once; a tensor whose rms is 0, such as a zero bias,
  is unchanged), then ``Δ(σ) = L(W + noise) − L(W)``, reported as the mean and the sample std
  (n − 1) over the K draws. Draw k of every σ uses the same z (a ``torch.Generator`` seeded with
  ``seed + k``, drawn on the CPU in ``named_parameters`` order), so Δ(σ) is a curve in σ.

* :func:`quantization`: weight-only round-to-nearest (RTN) of the linear layers (``nn.Linear`` and
  GPT-2's ``Conv1D``) as fake quantization, symmetric with zero point 0 and no clipping (the
  arithmetic of torchao's affine primitives with ``MappingType.SYMMETRIC_NO_CLIPPING_ERR``, bitwise,
  in plain torch): for each block B of the weight in (out, in) orientation (int8: one block per
  output channel, a whole row; int4: groups of ``group_size`` consecutive input weights of a row),

      s_B = max(max(W_B⁺) / q_max, min(W_B⁻) / q_min)  (≥ the smallest normal float),
      Ŵ_B = s_B · clamp(round(W_B / s_B), q_min, q_max),

  with [q_min, q_max] = [−128, 127] (int8) and [−8, 7] (int4). Then ``Δ = L(Ŵ) − L(W)``. The scale is
  the smallest that represents every weight of the block without clipping, so weights already on
  the grid (``s · q``, q an integer, with q_max·s or q_min·s present) are left exactly as they are.
  Embeddings (and a head tied to them) and 1-D tensors (norm gains, biases) stay in full precision
  unless ``embeddings=True`` / ``norms=True`` (a 1-D tensor is then one row). A group size that does
  not divide a layer's input width is a ``ValueError`` naming the layer.

* :func:`forgetting_summary` (the runs themselves are the harness's): after fine-tuning on a
  second corpus at each learning rate of a grid, point i is (x_i, y_i) = (the second corpus's
  validation loss, the original corpus's validation loss − its value before fine-tuning). The
  frontier is the lower-left Pareto set of the points and the start (x₀, 0) (before fine-tuning:
  nothing learned, nothing forgotten): sorted by x, a point is kept when its y is below the y of
  every point with a smaller x (a point that learned less *and* forgot more is dropped). The
  summary ``increase`` is the frontier's y at a learning level x*: linear between the two frontier
  points whose x bracket x*; beyond the frontier's right end (a level every kept point learned
  past, as when fine-tuning lowers both losses and the start is dominated) the right end's y, the
  least forgetting at which that much was learned; below its left end (more learning than any
  point reached) None, no extrapolation. x* is the caller's target, by default the most-learned
  point's x (the frontier's left end); a comparison reads every run at one common x*
  (:mod:`samlm.studies.robustness_report`).

Every measure restores the model's parameters and buffers bitwise (``copy_`` from a snapshot) and
its train/eval mode, even when ``evaluate`` raises. Torch only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

Evaluate = Callable[[nn.Module], float]

QUANT_FORMATS = {"int8": (-128, 127), "int4": (-8, 7)}
DEFAULT_SIGMAS = (0.01, 0.02, 0.05, 0.1)
DEFAULT_GROUP_SIZE = 32


# --------------------------------------------------------------------------- restoring the model


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Within the block the model may change; afterwards its parameters, buffers and train/eval
    mode are bitwise what they were (snapshot clones, ``copy_`` back: the tensors stay the same
    objects, so an optimizer or a tied weight still points at them)."""
    tensors = list(model.parameters()) + list(model.buffers())
    snapshot = [t.detach().clone() for t in tensors]
    training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, saved in zip(tensors, snapshot):
                tensor.copy_(saved)
        model.train(training)


def _loss(model: nn.Module, evaluate: Evaluate) -> float:
    model.eval()
    with torch.no_grad():
        value = float(evaluate(model))
    return value


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# --------------------------------------------------------------------------- weight noise


def check_sigmas(sigmas: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(s) for s in sigmas)
    if not values:
        raise ValueError("no noise scale sigma given")
    for sigma in values:
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"a noise scale sigma must be a finite number >= 0, got {sigma:g}")
    return values


def weight_noise(
    model: nn.Module, evaluate: Evaluate, *, sigmas: Iterable[float] = DEFAULT_SIGMAS, draws: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Δloss under W_t + σ·rms(W_t)·z per parameter tensor (module docstring), for each σ:
    ``{"base_loss", "sigmas", "draws", "seed", "delta_mean", "delta_std", "losses"}`` (``losses[i][k]``:
    σ_i, draw k). The model is restored bitwise."""
    sigmas = check_sigmas(sigmas)
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    with restored(model):
        base = _loss(model, evaluate)
        original = [p.detach().clone() for p in params]
        scales = [p.detach().float().pow(2).mean().sqrt() for p in params]
        losses = [[0.0] * draws for _ in sigmas]
        for k in range(draws):
            generator = torch.Generator().manual_seed(seed + k)
            noise = [torch.randn(p.shape, generator=generator, dtype=torch.float32) for p in params]
            for i, sigma in enumerate(sigmas):
                with torch.no_grad():
                    for p, w, z, rms in zip(params, original, noise, scales):
                        p.copy_(w + (sigma * rms * z.to(p.device)).to(p.dtype))
                losses[i][k] = _loss(model, evaluate)
    stats = [_mean_std([loss - base for loss in row]) for row in losses]
    return {
        "base_loss": base,
        "sigmas": list(sigmas),
        "draws": draws,
        "seed": seed,
        "delta_mean": [m for m, _ in stats],
        "delta_std": [s for _, s in stats],
        "losses": losses,
        "scaling": "W + sigma * rms(W) * z per tensor",
    }


# --------------------------------------------------------------------------- quantization


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is (in, out). Duck-typed, so
    the diagnostics do not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def quantizable_weights(
    model: nn.Module, *, embeddings: bool = False, norms: bool = False
) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, weight, transposed)`` of each tensor RTN quantizes, each once: the weights of the
    linear layers (``transposed``: stored (in, out), GPT-2's ``Conv1D``); with ``embeddings``, the
    embedding tables (a head tied to one is an embedding); with ``norms``, every 1-D tensor."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, tuple[str, torch.Tensor, bool]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in chosen:
            continue
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            if id(weight) in embedding_ids and not embeddings:
                continue
            chosen[id(weight)] = (name, weight, _is_conv1d(module))
        elif isinstance(module, nn.Embedding) and embeddings:
            chosen[id(weight)] = (name, weight, False)
    if norms:
        for name, param in model.named_parameters():
            if param.dim() == 1 and id(param) not in chosen:
                chosen[id(param)] = (name.rsplit(".", 1)[0] if "." in name else name, param, False)
    return list(chosen.values())


def rtn(weight: torch.Tensor, fmt: str, *, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """Round-to-nearest fake quantization of a weight in (out, in) orientation (a 1-D tensor: one
    row), module docstring: int8 per output channel, int4 in groups of ``group_size`` input weights.
    Returns a new tensor, float32 math, ``weight``'s dtype. Each operation is the one torchao's
    ``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine`` apply, in the same order
    (a multiply by the reciprocal scale, not a divide), so the results are bitwise theirs."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r} (choose from {', '.join(QUANT_FORMATS)})")
    q_min, q_max = QUANT_FORMATS[fmt]
    matrix = weight.detach().float()
    matrix = matrix.reshape(1, -1) if matrix.dim() == 1 else matrix.reshape(matrix.shape[0], -1)
    blocks = matrix.reshape(matrix.shape[0], -1, matrix.shape[1] if fmt == "int8" else group_size)
    low = blocks.amin(-1, keepdim=True).clamp(max=0)
    high = blocks.amax(-1, keepdim=True).clamp(min=0)
    scale = torch.maximum(high / q_max, low / q_min).clamp(min=torch.finfo(torch.float32).smallest_normal)
    # Integer codes: the round trip through int8 also turns a -0.0 into 0.0, as a real int grid does.
    codes = torch.clamp(torch.round(blocks * (1.0 / scale)), q_min, q_max).to(torch.int8)
    return (codes.float() * scale).reshape(weight.shape).to(weight.dtype)


def check_group_size(model: nn.Module, group_size: int, *, embeddings: bool = False, norms: bool = False) -> None:
    """A ``ValueError`` naming the first layer whose input width ``group_size`` does not divide."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"the group size must be a positive integer, got {group_size!r}")
    for name, weight, transposed in quantizable_weights(model, embeddings=embeddings, norms=norms):
        width = weight.shape[0] if transposed else (weight.numel() if weight.dim() == 1 else weight.shape[-1])
        if width % group_size:
            raise ValueError(
                f"group size {group_size} does not divide the input width {width} of layer "
                f"'{name or type(model).__name__}'"
            )


def quantize_weights(
    model: nn.Module, fmt: str, *, group_size: int = DEFAULT_GROUP_SIZE, embeddings: bool = False, norms: bool = False
) -> int:
    """Replace (in place) each quantizable weight by its RTN fake quantization; the number of
    tensors quantized. Wrap in :func:`restored` to get the weights back."""
    if fmt == "int4":
        check_group_size(model, group_size, embeddings=embeddings, norms=norms)
    chosen = quantizable_weights(model, embeddings=embeddings, norms=norms)
    with torch.no_grad():
        for _, weight, transposed in chosen:
            if transposed:
                weight.copy_(rtn(weight.t(), fmt, group_size=group_size).t())
            else:
                weight.copy_(rtn(weight, fmt, group_size=group_size))
    return len(chosen)


def quantization(
    model: nn.Module,
    evaluate: Evaluate,
    *,
    formats: Sequence[str] = ("int8", "int4"),
    group_size: int = DEFAULT_GROUP_SIZE,
    embeddings: bool = False,
    norms: bool = False,
    base_loss: float | None = None,
) -> dict[str, Any]:
    """Δloss under weight-only RTN (module docstring) for each format:
    ``{"base_loss", "group_size", "embeddings", "norms", "int8": {"loss", "delta", "tensors"}, ...}``.
    ``base_loss``: L(W) when the caller has measured it already (then not measured again). The model
    is restored bitwise."""
    if "int4" in formats:
        check_group_size(model, group_size, embeddings=embeddings, norms=norms)
    result: dict[str, Any] = {
        "group_size": group_size,
        "embeddings": embeddings,
        "norms": norms,
        "method": "RTN, symmetric, no clipping, zero point 0 (fake quantization)",
    }
    with restored(model):
        base = _loss(model, evaluate) if base_loss is None else float(base_loss)
        result["base_loss"] = base
        original = [t.detach().clone() for t in model.parameters()]
        for fmt in formats:
            with torch.no_grad():
                for tensor, saved in zip(model.parameters(), original):
                    tensor.copy_(saved)
            count = quantize_weights(model, fmt, group_size=group_size, embeddings=embeddings, norms=norms)
            loss = _loss(model, evaluate)
            result[fmt] = {"loss": loss, "delta": loss - base, "tensors": count}
    return result


# --------------------------------------------------------------------------- forgetting


def pareto_frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower-left Pareto set of (x, y) points (less is better in both), sorted by x: a point is
    kept when its y is strictly below the y of every point with a smaller x (equal x: the lowest y).
    Non-finite points are dropped."""
    frontier: list[tuple[float, float]] = []
    for x, y in sorted((float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)):
        if not frontier or y < frontier[-1][1]:
            frontier.append((x, y))
    return frontier


def interpolate(frontier: Sequence[tuple[float, float]], x: float) -> float | None:
    """The frontier's y at ``x``: linear between the two points whose x bracket it; the right end's
    y beyond the right end; None left of the left end (or for a non-finite ``x``)."""
    if not frontier or not math.isfinite(x) or x < frontier[0][0]:
        return None
    if x >= frontier[-1][0]:
        return frontier[-1][1]
    for (x0, y0), (x1, y1) in zip(frontier, frontier[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return frontier[-1][1]


def forgetting_summary(
    points: Sequence[Mapping[str, Any]], *, before_learning: float, before_original: float, target: float | None = None
) -> dict[str, Any]:
    """The learning–forgetting summary of fine-tuning runs (module docstring). ``points``: one
    mapping per learning rate with ``lr``, ``learning`` (second corpus's val loss after) and
    ``original`` (original corpus's val loss after); ``before_*``: both losses before fine-tuning."""
    rows = [dict(p, increase=p["original"] - before_original) for p in points]
    frontier = pareto_frontier([(before_learning, 0.0)] + [(r["learning"], r["increase"]) for r in rows])
    if target is None and frontier:
        target = frontier[0][0]
    return {
        "before": {"learning": before_learning, "original": before_original},
        "points": rows,
        "frontier": [list(p) for p in frontier],
        "target": target,
        "increase": None if target is None else interpolate(frontier, target),
    }
