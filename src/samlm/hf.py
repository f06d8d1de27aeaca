"""``from samlm.hf import SAMTrainer``: the short path, kept as an alias of
:mod:`samlm.integrations.hf` (where the code lives) so that scripts written against the earlier
``samlm.hf`` keep working. Also ``SAMSFTTrainer`` with TRL installed (:mod:`samlm.integrations.sft`)."""

from samlm.integrations.hf import *  # noqa: F403
from samlm.integrations.hf import __all__  # noqa: F401


def __getattr__(name: str):
    """``SAMSFTTrainer``, built the first time it is asked for (it needs TRL); else ``integrations.hf``'s."""
    if name == "SAMSFTTrainer":
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise ImportError("SAMSFTTrainer is TRL's SFTTrainer with SAM steps: it needs TRL (pip install trl)")
        from samlm.integrations.sft import SAMSFTTrainer

        return SAMSFTTrainer
    from samlm.integrations import hf

    return getattr(hf, name)
