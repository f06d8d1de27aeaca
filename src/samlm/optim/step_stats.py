"""What one optimizer step measured: ``StepStats``.

A SAM step evaluates the loss twice, on different rows: at w on the ascent rows only (the first
``ascent_fraction`` of the batch, 0.25 by default) and at w+ε on every row. The two means are
named for what they cover, ``ascent_loss`` and ``loss_perturbed``, so that neither reads as the
batch's loss at w, which a SAM step with ``ascent_fraction < 1`` does not compute; the ascent rows
are a quarter of the batch, so ``loss_perturbed`` can come out below ``ascent_loss``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

_LOSS_DEPRECATED = (
    "StepStats.loss is deprecated and will be removed in the next release: it is the mean loss at w "
    "on the ascent rows only (the first ascent_fraction of the batch), now named ascent_loss; the mean "
    "loss at w+ε over the whole batch is loss_perturbed"
)


@dataclass(kw_only=True)
class StepStats:
    """What one optimizer step measured (floats; built by keyword).

    A plain step (a plain optimizer, or a plain step of a SAM schedule) has one pass at w over
    every row: there ``ascent_loss`` and ``loss_perturbed`` are both that batch mean. A step with
    no pass at w (Momentum-SAM's ε comes from the base's momentum) has ``ascent_loss`` None.
    """

    ascent_loss: float | None  # mean loss at w on the ascent rows (every row for a plain step)
    loss_perturbed: float  # mean loss at w+ε over all rows
    grad_norm: float  # ‖g‖ of the ascent gradient (scaled by the rule's T or 1/P; Momentum-SAM: ‖m‖ or ‖u‖)
    eps_norm: float  # ‖ε‖
    update_grad_norm: float  # ‖d‖ of the descent gradient fed to the base optimizer
    skipped: bool  # the base step was not taken (non-finite gradient)
    ascent_nonfinite: bool  # the ascent gradient was non-finite (ε = 0 or step skipped)
    sam_step: bool = True  # a SAM-family step (False: a plain step, of any optimizer)
    logit_path_norm: float | None = None  # ‖g_SAM − g_F‖, with split=True
    functional_path_norm: float | None = None  # ‖g_F − g‖, with split=True

    @property
    def loss(self) -> float:
        """Deprecated: ``ascent_loss`` (the loss at w on the ascent rows, not the batch's)."""
        # FutureWarning, as torch deprecates: shown to users by default, once per call site
        warnings.warn(_LOSS_DEPRECATED, FutureWarning, stacklevel=2)
        return self._old_loss()

    def _old_loss(self) -> float:
        # a step without a pass at w has one loss, at w+ε: the old name keeps a finite value there
        return self.loss_perturbed if self.ascent_loss is None else self.ascent_loss

    def as_dict(self) -> dict[str, float]:
        """The fields that are set, by name. Until the next release it also holds ``"loss"``
        (= ``ascent_loss``, or ``loss_perturbed`` for a step without a pass at w) for readers of
        the old key, which a dict cannot warn about."""
        values = {k: v for k, v in asdict(self).items() if v is not None}
        values["loss"] = self._old_loss()
        return values
