"""The one registry of optimization methods: every fact about a method lives in its entry.

Every ``--optimizer`` choice list, ``samlm bench``, both compares, ``samlm.integrations.hf`` and
``build_optimizer`` read this table. Adding a method is one entry here, or one ``register(Method(...))``
call from user code (and its class).

A method's cost is counted in passes over rows of the batch, on top of the one forward+backward
of every row that any optimizer runs:

    ascent         forward+backward on the ascent rows, ⌈ascent_fraction · b⌉ (SAM family)
    clean_forward  forward without a parameter backward on the other rows (functional descent:
                   r(w) for the rows the ascent did not see)

``step_cost`` turns them into a step's compute relative to a plain step, with a backward costing
``BACKWARD_TO_FORWARD`` forwards (the usual 2:1 of a transformer's matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from .looksam import LookSAM
from .sam import (
    ASAM,
    SAM,
    FunctionalSAM,
    MomentumSAM,
    PreconditionedFunctionalSAM,
    PreconditionedMomentumSAM,
    PreconditionedSAM,
    SharpnessAware,
)

BACKWARD_TO_FORWARD = 2.0
ASCENT = "ascent"
CLEAN_FORWARD = "clean_forward"


@dataclass(frozen=True)
class Method:
    """One optimization method. ``cls`` is None for a plain base optimizer, else a ``SharpnessAware``
    subclass built as ``cls(base, rho=..., **options)``."""

    name: str
    description: str
    cls: type | None = None
    default_rho: float | None = None

    @property
    def is_sam(self) -> bool:
        return self.cls is not None

    @property
    def functional(self) -> bool:
        """Descends along J(w+ε)ᵀ r(w) (Functional-SAM), which needs r(w) on every row."""
        # register() checks that cls is a SharpnessAware subclass
        return self.is_sam and cast("type[SharpnessAware]", self.cls).descent_rule.needs_clean_cotangent

    @property
    def extra_passes(self) -> tuple[str, ...]:
        if not self.is_sam:
            return ()
        rule = getattr(self.cls, "perturbation_rule", None)
        if not getattr(rule, "needs_ascent_gradient", True):
            return ()  # ε from the base's momentum: the descent is the step's one pass (Momentum-SAM)
        return (ASCENT, CLEAN_FORWARD) if self.functional else (ASCENT,)

    def step_cost(self, ascent_fraction: float = 0.25, sam_every: int = 1, sam_start_fraction: float = 0.0) -> float:
        """Forward+backward compute of one step relative to a plain optimizer's step, averaged
        over the run: the extra passes on every ``sam_every``-th step after the first
        ``sam_start_fraction`` of the run (LookSAM: every ``sam_every``·look_every-th, its default)."""
        full = 1.0 + BACKWARD_TO_FORWARD
        cost = 1.0
        if ASCENT in self.extra_passes:
            cost += ascent_fraction
        if CLEAN_FORWARD in self.extra_passes:
            cost += (1.0 - ascent_fraction) / full
        every = sam_every * getattr(self.cls, "default_look_every", 1)
        return 1.0 + (1.0 - sam_start_fraction) * (cost - 1.0) / every  # cost - 1.0 is exact


# Base optimizers: what a SAM-family method wraps (``--base``), and plain methods of their own.
# "muon": torch.optim.Muon on the hidden matrices, AdamW on the rest (optim.bases.muon_split).
BASE_OPTIMIZERS = ("adamw", "sgd", "adafactor", "muon")

METHODS: dict[str, Method] = {}


def register(entry: Method) -> Method:
    """Add a method: its entry is then a choice of every command and of ``build_optimizer``.
    A SAM-family class built with ``rho=None`` takes the entry's default ρ."""
    if entry.name in METHODS:
        raise ValueError(f"method {entry.name!r} is registered already")
    if entry.is_sam:
        if not (isinstance(entry.cls, type) and issubclass(entry.cls, SharpnessAware)):
            raise ValueError(f"{entry.name}: cls must be a SharpnessAware subclass, got {entry.cls!r}")
        entry.cls.default_rho = entry.default_rho
    METHODS[entry.name] = entry
    return entry


def sam_family() -> tuple[str, ...]:
    """The registered SAM-family methods, in registration order."""
    return tuple(name for name, m in METHODS.items() if m.is_sam)


for _entry in (
    Method("adamw", "AdamW (decoupled weight decay), no perturbation"),
    Method("adafactor", "Adafactor (factored second moments), no perturbation"),
    Method("sgd", "SGD with momentum, no perturbation"),
    Method("muon", "Muon (torch.optim.Muon) on the hidden matrices, AdamW on the rest, no perturbation"),
    Method("sam", "SAM (Foret et al. 2021) with micro-batch ascent (Bahri et al. 2022)", SAM, 0.05),
    Method("asam", "ASAM (Kwon et al. 2021): scale-invariant perturbation", ASAM, 0.5),
    Method("fsam", "Functional-SAM (Singh et al. 2025): functional descent path only", FunctionalSAM, 0.05),
    Method("psam", "preconditioned SAM (Singh et al. 2025): ε scaled by 1/(√v̂+eps)", PreconditionedSAM, 0.05),
    Method("pfsam", "preconditioned Functional-SAM (Singh et al. 2025)", PreconditionedFunctionalSAM, 0.05),
    Method(
        "msam", "Momentum-SAM (Becker et al. 2024): ε = −ρ m/‖m‖ from the base's momentum, no ascent", MomentumSAM, 0.3
    ),
    Method(
        "pmsam",
        "preconditioned Momentum-SAM: ε along the base's update direction (AdamW m̂/(√v̂+eps)), no ascent",
        PreconditionedMomentumSAM,
        0.05,
    ),
    Method(
        "looksam", "LookSAM (Liu et al. 2022): SAM every 5th step, its orthogonal part reused between", LookSAM, 0.05
    ),
):
    register(_entry)

SAM_FAMILY = sam_family()  # the built-in SAM family (``sam_family()`` includes methods registered later)


def method(name: str) -> Method:
    """The registry entry of ``name``; a ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r} (choose from {', '.join(METHODS)})") from None


def method_of(optimizer: object) -> Method | None:
    """The entry whose class built ``optimizer`` (a SharpnessAware instance), else None."""
    if not isinstance(optimizer, SharpnessAware):
        return None
    return next((m for m in METHODS.values() if m.cls is type(optimizer)), None)
