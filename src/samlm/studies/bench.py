"""Benchmark step time and peak memory of AdamW, the PyPI peer's SAM and every samlm method.

All methods run side by side in one process, round-robin step by step, on identical
GPT-2-style models and the same batches, so the ratios against AdamW are not skewed by
drift in the machine's speed. Ratios are medians of per-round ratios, each against the AdamW
step of the same round. Peak memory is the peak of live tensor bytes over a method's first
steps on a fresh model: CUDA's allocator peak, or on CPU the same from the profiler's
allocation events (exact, unlike the resident set, which the C allocator blurs).

The bare passes a step is made of (the ascent forward+backward on the first rows, F-SAM's
no-grad forward on the others, a full-batch forward+backward) are timed in the same rounds.
They give each method's *floor*: AdamW's step plus the extra passes the method must run, over
AdamW's step. No exact implementation of the method can go below it; ``over_floor`` is what
the implementation adds on top (perturbation, restore, bookkeeping).

``--sam-every K`` runs samlm's SAM-family methods with a SAM step every K-th step. A round is
then K steps of every method, timed together (one whole cycle, whatever its phase), and a
method's floor is AdamW's step plus its extra passes / K.

``--base muon``: every method wraps Muon (hidden matrices) + AdamW (the rest), and the reference
is plain Muon+AdamW (``muon``). A method whose perturbation reads the base's geometry (psam,
pfsam) also orthogonalizes the ascent gradient of every Muon matrix (Newton–Schulz, as Muon
does): its floor adds that bare pass (``orthogonalize``: NS of every Muon matrix), timed in
the same rounds. The peer's SAM (pytorch-optimizer, around AdamW) is left out.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

from samlm.errors import UserError
from samlm.harness import settings as s
from samlm.harness.pretrain.config import ModelSettings
from samlm.harness.settings import override, setting
from samlm.io import atomic_write_json
from samlm.optim import build_muon, muon_split, newton_schulz, train_step
from samlm.optim.batching import plan_step
from samlm.optim.registry import method, sam_family

# Bench-only pseudo-methods beside the registry's: each is (registry method it runs, extra passes).
FULL = "full"  # a forward+backward of the whole batch
ORTHOGONALIZE = "orthogonalize"  # Newton–Schulz of every Muon matrix's gradient (--base muon)
PSEUDO_METHODS = {
    "peer_sam": ("sam", (FULL,)),  # pytorch-optimizer's SAM: two full-batch passes
    "sam_full": ("sam", (FULL,)),  # samlm's SAM with ascent_fraction = 1
}


def extra_passes(name: str, base: str = "adamw") -> tuple[str, ...]:
    """The passes ``name`` runs on top of the base optimizer's one forward+backward of the batch
    (around Muon, a geometry-reading perturbation also orthogonalizes the ascent gradient)."""
    passes = PSEUDO_METHODS[name][1] if name in PSEUDO_METHODS else method(name).extra_passes
    if base == "muon" and name in sam_family() and reads_geometry(name):
        passes = (*passes, ORTHOGONALIZE)
    return passes


def reads_geometry(name: str) -> bool:
    """The SAM-family method's perturbation reads its base optimizer's geometry (preconditioned)."""
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    cls = method(name).cls
    assert cls is not None  # a SAM-family method
    return bool(cls(probe, rho=0.1).perturbation.needs_preconditioner)


def method_rho(args, name: str) -> float | None:
    """--rho, or the registry default of the method ``name`` runs."""
    return args.rho if args.rho is not None else method(PSEUDO_METHODS.get(name, (name,))[0]).default_rho


def cycle(args, name: str) -> int:
    """Steps per SAM step of ``name``: ``--sam-every`` for samlm's SAM-family methods, else 1."""
    return 1 if name in (reference_method(args), "peer_sam") else args.sam_every


def schedule_cycle(args, name: str) -> int:
    """Steps of one whole cycle of ``name``'s schedule: :func:`cycle`, times LookSAM's ``look_every``
    (one full SAM step, then cheap steps reusing it)."""
    cls = method(PSEUDO_METHODS.get(name, (name,))[0]).cls
    return cycle(args, name) * (getattr(cls, "default_look_every", 1) if name != "peer_sam" else 1)


def reference_method(args) -> str:
    """The method every ratio is against: the plain base optimizer (``adamw``; ``muon``: Muon+AdamW)."""
    return getattr(args, "base", "adamw")


def bench_methods() -> tuple[str, ...]:
    """What ``--methods`` accepts: AdamW, the pseudo-methods and every registered SAM method."""
    return ("adamw", *PSEUDO_METHODS, *sam_family())


def _device_default() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchConfig:
    """benchmark"""

    layers: int = override(ModelSettings, "layers")
    width: int = override(ModelSettings, "width", default=256)
    heads: int = override(ModelSettings, "heads")
    vocab: int = setting(256, "vocabulary size", check=s.positive_int)
    batch: int = override(s.BatchSettings, "batch")
    context: int = override(ModelSettings, "context")
    steps: int = setting(
        10, "timed steps per method, after the untimed ones (--sam-every K: rounds of K steps)", check=s.positive_int
    )
    untimed_steps: int = setting(2, "steps (rounds) per method run before timing", check=s.nonnegative_int)
    rho: float | None = override(s.OptimizerSettings, "rho")
    ascent_fraction: float = override(s.OptimizerSettings, "ascent_fraction")
    base: str = setting(
        "adamw",
        "the base optimizer every SAM-family method wraps, and the reference of every "
        "ratio (muon: Muon on the hidden matrices + AdamW on the rest)",
        choices=("adamw", "muon"),
    )
    sam_every: int = override(s.OptimizerSettings, "sam_every", metavar="K")  # a round: K steps of each method
    compile: bool = override(s.ParallelSettings, "compile")
    methods: str = setting(",".join(bench_methods()), "comma-separated subset of " + ",".join(bench_methods()))
    device: str = setting(_device_default(), "cpu, cuda or cuda:N")
    dtype: str = setting("fp32", "bf16: autocast", choices=("fp32", "bf16"))
    no_memory: bool = setting(False, "skip the peak-memory measurement")
    harness: bool = setting(
        False,
        "also time samlm pretrain's loop (data, stats, schedule; no evaluation) at the "
        "same shape on the built-in corpus, and report its step time over bench's",
    )
    json: str | None = setting(None, "also write the results as JSON", metavar="PATH")

    def check(self) -> None:
        if self.width % self.heads:
            raise UserError(f"--width {self.width} must be divisible by --heads {self.heads}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {self.device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        if self.harness and self.vocab != 256:
            raise UserError(
                f"--harness trains on the built-in corpus with the bytes tokenizer (256 tokens): "
                f"--vocab must be 256, got {self.vocab}"
            )


def _check(args) -> list[str]:
    s.validate(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ref = reference_method(args)
    if ref != "adamw":
        if "peer_sam" in methods and args.methods != ",".join(bench_methods()):
            raise UserError(f"--methods peer_sam is pytorch-optimizer's SAM around AdamW: not with --base {ref}")
        methods = [ref if m == "adamw" else m for m in methods if m != "peer_sam"]
    choices = (ref, *bench_methods()[1:])
    unknown = sorted(set(methods) - set(choices))
    if unknown:
        raise UserError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(choices)}")
    if ref not in methods:
        methods.insert(0, ref)  # the reference of every ratio
    return methods


def build_model(args) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=args.context,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 1,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(args.device)


def lm_loss(logits, batch):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


class _PeerStep:
    """pytorch-optimizer's SAM used as its README shows: two full-batch passes per step."""

    def __init__(self, model, args):
        from pytorch_optimizer import SAM as PeerSAM

        self.model = model
        self.opt = PeerSAM(
            model.parameters(), base_optimizer=torch.optim.AdamW, rho=method_rho(args, "peer_sam"), lr=1e-4
        )

    def __call__(self, batch, forward, autocast):
        with autocast():
            loss = lm_loss(forward(batch), batch)
        loss.backward()
        self.opt.first_step(zero_grad=True)
        with autocast():
            lm_loss(forward(batch), batch).backward()
        self.opt.second_step(zero_grad=True)


def make_stepper(name: str, model, args):
    """A callable(batch, forward, autocast) that takes one optimizer step of ``name``."""
    if name == "peer_sam":
        return _PeerStep(model, args)
    base: torch.optim.Optimizer
    if reference_method(args) == "muon":
        base = build_muon(model, lr=1e-4, weight_decay=0.01)  # AdamW's default weight decay, as below
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt: torch.optim.Optimizer
    if name == reference_method(args):
        opt = base
    else:
        runs = PSEUDO_METHODS.get(name, (name,))[0]
        fraction = 1.0 if name == "sam_full" else args.ascent_fraction
        cls = method(runs).cls
        assert cls is not None  # every benchmarked method but the reference is SAM-family
        opt = cls(base, rho=method_rho(args, name), ascent_fraction=fraction, sam_every=cycle(args, name))
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def step(batch, forward, autocast):
        train_step(opt, batch, forward, lm_loss, autocast_dtype=autocast_dtype)

    cast(Any, step).optimizer = opt
    return step


class _BarePasses:
    """The bare passes of a step, without any optimizer, one method per pass name: ``full``
    (forward+backward on the batch), ``ascent`` (forward+backward on the first
    ⌈ascent_fraction·b⌉ rows) and ``clean_forward`` (a no-grad forward and the output cotangent
    on the remaining rows)."""

    def __init__(self, model, args):
        self.model = model
        self.ascent_rows = plan_step([args.batch], args.ascent_fraction, 1)[0].ascent_rows  # as the driver
        self.matrices = (
            [torch.randn_like(p) for p in muon_split(model)[0]] if reference_method(args) == "muon" else []
        )  # stand-ins for Muon's gradients

    def orthogonalize(self, batch, forward, autocast):
        for g in self.matrices:  # what Muon's geometry computes for the ascent direction
            newton_schulz(g)

    def full(self, batch, forward, autocast):
        self._backward(batch, forward, autocast)

    def ascent(self, batch, forward, autocast):
        self._backward(batch[: self.ascent_rows], forward, autocast)

    def clean_forward(self, batch, forward, autocast):
        rest = batch[self.ascent_rows :]
        if len(rest) == 0:
            return
        with torch.no_grad(), autocast():
            logits = forward(rest)
        leaf = logits.detach().requires_grad_()
        torch.autograd.grad(lm_loss(leaf, rest), leaf)

    def _backward(self, batch, forward, autocast):
        self.model.zero_grad(set_to_none=True)
        with autocast():
            loss = lm_loss(forward(batch), batch)
        loss.backward()


def _autocast_factory(args):
    if args.dtype == "bf16":
        return lambda: torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device_type="cpu", enabled=False)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(args, methods: list[str]) -> dict[str, list[float]]:
    """Per-round step times of every method, and of every bare pass the methods need (keyed
    ``pass:NAME``), in one round-robin: a round runs each as many steps as the longest schedule
    cycle (``--sam-every``, times LookSAM's ``look_every``), timed together, and records the mean."""
    reference = build_model(args)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.context), generator=generator).to(args.device) for _ in range(4)
    ]
    models = {name: copy.deepcopy(reference) for name in methods}
    steppers = {name: make_stepper(name, models[name], args) for name in methods}
    passes_model = copy.deepcopy(reference)
    probes = _BarePasses(passes_model, args)
    for kind in sorted({kind for name in methods for kind in extra_passes(name, reference_method(args))}):
        steppers[f"pass:{kind}"] = getattr(probes, kind)
        models[f"pass:{kind}"] = passes_model
    autocast = _autocast_factory(args)
    calls = {name: torch.compile(model) if args.compile else model for name, model in models.items()}

    def step_of(name):
        forward = lambda batch, model=calls[name]: model(input_ids=batch).logits  # noqa: E731
        return lambda k: steppers[name](batches[k % len(batches)], forward, autocast)

    return round_robin(
        {name: step_of(name) for name in steppers},
        rounds=args.steps,
        untimed=args.untimed_steps,
        per_round=math.lcm(*(schedule_cycle(args, name) for name in methods)),
        device=args.device,
    )


def round_robin(
    steps: Mapping[str, Callable[[int], object]], *, rounds: int, untimed: int = 0, per_round: int = 1, device="cpu"
) -> dict[str, list[float]]:
    """Time ``steps[name](k)`` (one step of ``name`` on its ``k``-th batch) side by side: ``untimed`` +
    ``rounds`` rounds, each running every name ``per_round`` times in a row (a whole cycle of a SAM
    schedule, whatever its phase), timed together. Returns each name's mean step time per timed round.
    Round-robin, so every name sees the same machine conditions, in a fresh order each round, so that
    no name always follows the same neighbour (allocator, cache state)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for i in range(untimed + rounds):
        random.Random(i).shuffle(order)
        for name in order:
            _sync(device)
            start = time.perf_counter()
            for j in range(per_round):
                steps[name](i * per_round + j)
            _sync(device)
            if i >= untimed:
                times[name].append((time.perf_counter() - start) / per_round)
    return times


def time_harness(args, name: str) -> list[float]:
    """Step times of ``samlm pretrain``'s loop for ``name`` at the bench's shape: the time between
    consecutive steps' ``on_step`` calls (data, the step, statistics, the schedule; the evaluation
    and checkpoint of the last step are left out), over the timed steps."""
    import tempfile

    from samlm.harness.pretrain import PretrainConfig, pretrain

    if name not in sam_family() and name != reference_method(args):
        return []  # the pseudo-methods (peer_sam, sam_full) have no harness run
    steps = (args.untimed_steps + args.steps) * args.sam_every + 1
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="samlm-bench-") as out:
        config = PretrainConfig(
            arch="gpt2",
            layers=args.layers,
            width=args.width,
            heads=args.heads,
            context=args.context,
            batch=args.batch,
            tokenizer="bytes",
            steps=steps,
            warmup=0,
            optimizer=name,
            base=reference_method(args),
            rho=method_rho(args, name) if name != reference_method(args) else None,
            ascent_fraction=args.ascent_fraction,
            sam_every=cycle(args, name),
            eval_every=0,
            save_every=0,
            val_batches=1,
            sharpness=False,
            compile=args.compile,
            device=args.device,
            mixed_precision="bf16" if args.dtype == "bf16" else None,
            threads=torch.get_num_threads(),
            progress=False,
            out=out,
            overwrite=True,
        )

        def on_step(step, stats):
            _sync(args.device)
            stamps.append(time.perf_counter())

        pretrain(config, on_step=on_step)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = per_step[args.untimed_steps * args.sam_every :]
    # rounds of K steps, as the bench times them
    return [sum(timed[i : i + args.sam_every]) / args.sam_every for i in range(0, len(timed), args.sam_every)]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's own start/stop lines, which its C++ logger writes to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_tensor_mb(run) -> float:
    """Peak of the tensor bytes that ``run()`` allocates and holds at once, over those live
    before it: torch's CPU allocator reports every allocation and free to the profiler, so
    this is exact and repeatable, and means what CUDA's ``max_memory_allocated`` means."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if _is_memory_event(e)), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _is_memory_event(event) -> bool:
    try:
        return event.name() == "[memory]"
    except UnicodeDecodeError:  # some op names come back undecodable; they are not memory events
        return False


def peak_memory_mb(args, name: str) -> float:
    """Peak tensor memory of a method's first steps on a fresh model, on top of the model
    itself: optimizer state, gradients, activations and any SAM buffer. CUDA: the allocator's
    peak; CPU: the same quantity, from the profiler's allocation events."""
    model = build_model(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
    batch = batch.to(args.device)
    stepper = make_stepper(name, model, args)
    autocast = _autocast_factory(args)

    def run():
        for _ in range(3):
            stepper(batch, lambda b: model(input_ids=b).logits, autocast)  # noqa: F821 (deleted only after its last call)

    if not args.device.startswith("cuda"):
        return _cpu_peak_tensor_mb(run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del model, stepper
    torch.cuda.empty_cache()
    return peak


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    return (
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )


def ratios(
    times: dict[str, list[float]], methods: list[str], cycles=None, base: str = "adamw"
) -> dict[str, dict[str, Any]]:
    """Each method's median step time, median per-round ratio against the plain ``base`` (AdamW;
    and its quartiles: the machine's noise), and floor (the base's step plus the method's extra
    bare passes, over the base's step; per round, then the median). ``cycles``: a method's steps
    per SAM step (its extra passes count 1/K per step; default 1)."""
    adamw = times[base]
    rows = {}
    for name in methods:
        per_round = [t / a for t, a in zip(times[name], adamw)]
        k = (cycles or {}).get(name, 1)
        floor = [
            1 + sum(times[f"pass:{kind}"][i] for kind in extra_passes(name, base)) / k / a for i, a in enumerate(adamw)
        ]
        ratio, floor_ratio = statistics.median(per_round), statistics.median(floor)
        q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else (ratio,) * 3
        rows[name] = {
            "step_s": round(statistics.median(times[name]), 5),
            "ratio": round(ratio, 3),
            "ratio_iqr": [round(q1, 3), round(q3, 3)],
            "floor": round(floor_ratio, 3),
            "over_floor": round(ratio / floor_ratio, 3),
        }
    return rows


def run_bench(args: BenchConfig) -> dict:
    """Time and measure every method of ``args``; the report (also written to ``args.json``)."""
    methods = _check(args)
    times = time_methods(args, methods)
    params = sum(p.numel() for p in build_model(args).parameters())
    ref = reference_method(args)
    results = ratios(times, methods, {name: schedule_cycle(args, name) for name in methods}, base=ref)
    passes = {
        name.removeprefix("pass:"): round(statistics.median(t), 5)
        for name, t in times.items()
        if name.startswith("pass:")
    }
    if args.harness:
        for name in methods:
            loop = time_harness(args, name)
            if loop:
                results[name]["harness_step_s"] = round(statistics.median(loop), 5)
                results[name]["harness_over_bench"] = round(statistics.median(loop) / results[name]["step_s"], 3)
    for name in methods:
        if not args.no_memory:
            results[name]["peak_mem_mb"] = round(peak_memory_mb(args, name), 1)
    if not args.no_memory:
        for row in results.values():
            row["extra_mem_mb"] = round(row["peak_mem_mb"] - results[ref]["peak_mem_mb"], 1)
    for name in methods:
        if name != ref:
            results[name]["rho"] = method_rho(args, name)
    config = {
        k: getattr(args, k)
        for k in (
            "layers",
            "width",
            "heads",
            "vocab",
            "batch",
            "context",
            "steps",
            "untimed_steps",
            "rho",
            "ascent_fraction",
            "sam_every",
            "compile",
            "device",
            "dtype",
            "base",
        )
    }
    config.update(
        parameters=params,
        param_mb=round(params * 4 / 2**20, 1),
        machine=machine_description(args.device),
        torch=torch.__version__,
    )
    report = {"config": config, "methods": results, "passes_s": passes}
    if args.json:
        atomic_write_json(args.json, report)
    return report


def format_table(report: dict) -> str:
    cfg = report["config"]
    k = cfg.get("sam_every", 1)
    cycle_note, per_step = (f" (rounds of {k}: a SAM step every {k})", f" / {k}") if k > 1 else ("", "")
    base = cfg.get("base", "adamw")
    ref = {"adamw": "AdamW", "muon": "Muon"}.get(base, base)
    lines = [
        f"samlm bench: GPT-2 {cfg['layers']}L/{cfg['width']}d/{cfg['heads']}h, vocab {cfg['vocab']}, "
        f"batch {cfg['batch']}x{cfg['context']}, {cfg['parameters'] / 1e6:.2f}M params ({cfg['param_mb']} MB fp32), "
        f"{cfg['dtype']}, {cfg['machine']}, median of {cfg['steps']} steps{cycle_note}",
        f"{'method':<10} {'step (s)':>10} {'x ' + ref:>8} {'IQR':>13} {'floor':>7} {'x floor':>8} {'peak MB':>9} {'+ vs ' + ref:>10}",
    ]
    for name, row in report["methods"].items():
        mem = (
            f"{row['peak_mem_mb']:>9.1f} {row['extra_mem_mb']:>+10.1f}"
            if "peak_mem_mb" in row
            else f"{'-':>9} {'-':>10}"
        )
        q1, q3 = row.get("ratio_iqr", (row["ratio"], row["ratio"]))
        lines.append(
            f"{name:<10} {row['step_s']:>10.4f} {row['ratio']:>8.3f} {f'{q1:.3f}-{q3:.3f}':>13} {row['floor']:>7.3f} "
            f"{row['over_floor']:>8.3f} {mem}"
        )
    if any("harness_step_s" in row for row in report["methods"].values()):
        lines.append(
            "samlm pretrain's loop at the same shape (built-in corpus, no evaluation), median step: "
            + ", ".join(
                f"{name} {row['harness_step_s']:.4f} s ({row['harness_over_bench']:.3f}x bench)"
                for name, row in report["methods"].items()
                if "harness_step_s" in row
            )
        )
    passes = ", ".join(f"{kind} {seconds:.4f} s" for kind, seconds in report.get("passes_s", {}).items())
    if passes:
        lines.append(
            f"bare passes (median): {passes}; floor = ({ref} step + a method's extra passes{per_step}) "
            f"/ {ref} step" + (" (Muon + AdamW: every method wraps both)" if base == "muon" else "")
        )
    return "\n".join(lines)
