"""Studies: comparisons over optimizers × ρ × seeds (``compare``, ``finetune_compare``), their reports
(``report``, ``robustness_report``; ``runs``, ``stats``, ``plots``), the papers' studies, the demo and ``bench``."""
