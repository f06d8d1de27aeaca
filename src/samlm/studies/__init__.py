"""Studies: comparisons over optimizers × ρ × seeds (``compare``, ``finetune_compare``), their
reports (``report``), the demo and the step-time benchmark (``bench``)."""
