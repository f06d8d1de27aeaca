"""``from samlm.hf import SAMTrainer``: the short path, kept as an alias of
:mod:`samlm.integrations.hf` (where the code lives) so that scripts written against the earlier
``samlm.hf`` keep working. Also ``SAMTrainerMixin``, ``TrainerOptimizer`` and, with TRL
installed, ``SAMSFTTrainer``."""

from samlm.integrations.hf import *  # noqa: F403
from samlm.integrations.hf import __all__  # noqa: F401


def __getattr__(name: str):
    from samlm.integrations import hf

    return getattr(hf, name)  # SAMSFTTrainer, built when first asked for
