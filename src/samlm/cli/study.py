"""Run one of the papers' studies: pretrain (Singh et al. 2025) or finetune (Bahri et al. 2022)."""

from __future__ import annotations

import argparse

from samlm.harness import settings
from samlm.progress import say

# At import, not in add_arguments: a missing harness dependency then makes this command a stub
# that names what to install (samlm.cli.build_parser).
from samlm.studies import cheap_study, finetune_study, pretrain_study, robustness_study

STUDIES = ("pretrain", "finetune", "robustness", "cheap")
# The parsed arguments' attribute holding (run function, settings class) of the chosen study: a
# name no flag can take (as samlm.cli's own).
STUDY_ATTR = "_samlm_study"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="study", metavar="STUDY", parser_class=type(parser))

    pretrain = sub.add_parser(
        "pretrain",
        help="Functional-SAM / preconditioned SAM vs AdamW: sizes x methods, "
        "tuned (lr, rho), seeds, equal steps and equal compute, sharpness",
        description=pretrain_study.__doc__.strip().splitlines()[0],
    )
    settings.add_arguments(pretrain, pretrain_study.PretrainStudySettings)
    pretrain.set_defaults(**{STUDY_ATTR: (_run_pretrain, pretrain_study.PretrainStudySettings)})

    finetune = sub.add_parser(
        "finetune",
        help="SAM / Functional-SAM vs the baseline optimizer when fine-tuning on "
        "subsampled data: rho sweep, fractions, seeds, step budgets, best checkpoints",
        description=finetune_study.__doc__.strip().splitlines()[0],
    )
    settings.add_arguments(finetune, finetune_study.FinetuneStudySettings)
    finetune.set_defaults(**{STUDY_ATTR: (_run_finetune, finetune_study.FinetuneStudySettings)})

    robustness = sub.add_parser(
        "robustness",
        help="Watts et al.'s question on CPU: do AdamW, SAM, F-SAM and PF-SAM at "
        "their tuned (lr, rho) differ in weight-noise, int8/int4 and forgetting robustness at "
        "equal compute?",
        description=robustness_study.__doc__.strip().splitlines()[0],
    )
    settings.add_arguments(robustness, robustness_study.RobustnessStudySettings)
    robustness.set_defaults(**{STUDY_ATTR: (_run_robustness, robustness_study.RobustnessStudySettings)})

    cheap = sub.add_parser(
        "cheap",
        help="SAM at the base optimizer's price: AdamW, SAM, F-SAM, Momentum-SAM, PMSAM, LookSAM and "
        "SAM every 5th step, tuned, 5 seeds, equal steps and equal compute by the model and by the clock, "
        "robustness, on two corpora",
        description=cheap_study.__doc__.strip().splitlines()[0],
    )
    settings.add_arguments(cheap, cheap_study.CheapStudySettings)
    cheap.set_defaults(**{STUDY_ATTR: (_run_cheap, cheap_study.CheapStudySettings)})


def run(args: argparse.Namespace) -> int:
    study = getattr(args, STUDY_ATTR, None)
    if study is None:
        from samlm.errors import UserError

        raise UserError("samlm study needs a study: " + " or ".join(STUDIES))
    run_study, settings_class = study
    config = settings.from_args(settings_class, args)
    settings.validate(config)
    return run_study(config)


def _run_pretrain(config) -> int:
    from samlm.harness.pretrain import validate
    from samlm.studies.pretrain_study import run_study

    study = config.study()
    if config.dry_run:
        import dataclasses

        import torch

        total, unchecked = 0, False
        budget = study.data_budget()
        if budget is not None:
            base = study.base_config()
            print(
                f"data: {base.data} with tokenizer {base.tokenizer}, prepared once into {study.data_dir()}: "
                f"{budget.max_tokens:,} training and {budget.val_tokens:,} validation tokens"
            )
        for size, base in [(size, base) for size in study.preset.sizes for base in study.base_list()]:
            sweep = study.sweep(size, base).runs()
            for planned in sweep:
                run_config = planned.config
                if run_config.device.startswith("cuda") and not torch.cuda.is_available():
                    run_config, unchecked = dataclasses.replace(run_config, device="cpu"), True
                validate(run_config)
            total += len(sweep)
            print(
                f"{size.name}: {size.layers} layers x {size.width} wide, {size.heads} heads, base {base}: sweep "
                f"{len(sweep)} runs -> {study.sweep(size, base).out}, then each method's tuned point on seeds "
                f"{','.join(map(str, study.seeds or study.preset.seeds))} at equal steps and equal compute "
                f"-> {str(study.sweep(size, base).out)[: -len('sweep')]}final"
            )
        if unchecked:
            say("no CUDA here: every setting but the device was checked")
        say(f"dry run: {total} sweep runs are fine; nothing was written")
        return 0
    return _finished(run_study(study))


def _run_finetune(config) -> int:
    import dataclasses

    from samlm.harness.finetune import prepare
    from samlm.studies.finetune_study import run_study

    study = config.study()
    if config.dry_run:
        runs = study.sweep().runs()
        for name, config, _ in runs:
            prepare(dataclasses.replace(config, dry_run=True, overwrite=True))
            print(f"{name}: {config.out} ({config.steps} steps)")
        print(
            f"then each SAM-family method at its chosen rho at data fractions "
            f"{','.join(f'{f:g}' for f in study.preset.fractions)}; step budgets {study.budgets}"
        )
        say(f"dry run: {len(runs)} sweep runs are fine; nothing was written")
        return 0
    return _finished(run_study(study))


def _run_robustness(config) -> int:
    from samlm.harness.pretrain import validate
    from samlm.studies.robustness_study import run_study

    study = config.study()
    if config.dry_run:
        import dataclasses

        import torch

        planned = study.compare_config().runs()
        for run in planned:
            run_config = run.config
            if run_config.device.startswith("cuda") and not torch.cuda.is_available():
                run_config = dataclasses.replace(run_config, device="cpu")
            validate(run_config)
            print(f"{run.name}: {run_config.out} ({'+'.join(run.budgets)})")
        say(f"dry run: {len(planned)} runs are fine; nothing was written")
        return 0
    return _finished(run_study(study))


def _run_cheap(config) -> int:
    from samlm.harness.pretrain import validate
    from samlm.studies.cheap_study import estimate_seconds, minutes_text, run_study

    study = config.study()
    if config.dry_run:
        import dataclasses

        import torch

        total, unchecked = 0, False
        for corpus in study.preset.corpora:
            for stage, planned in (("sweep", study.sweep(corpus).runs()), ("final", study.final_runs(corpus))):
                for run in planned:
                    run_config = run.config
                    if run_config.device.startswith("cuda") and not torch.cuda.is_available():
                        run_config, unchecked = dataclasses.replace(run_config, device="cpu"), True
                    validate(run_config)
                    steps = "the calibration's steps" if run.estimated else f"{run.factor:.3g}x the steps"
                    print(f"{corpus.name} {stage}: {run.name} ({'+'.join(run.budgets)}; {steps})")
                total += len(planned)
        print(
            "final runs are listed at each method's first grid point: the sweep chooses the points; the "
            "clock budget's steps come from the calibration measured before the final runs (until then the "
            "FLOP model's)"
        )
        print(
            f"estimated time (preset's step times, {study.jobs or study.preset.jobs} at a time): "
            + minutes_text(estimate_seconds(study))
        )
        if unchecked:
            say("no CUDA here: every setting but the device was checked")
        say(f"dry run: {total} runs are fine; nothing was written")
        return 0
    return _finished(run_study(study))


def _finished(result) -> int:
    """Where a study's report is, how long it took, and the exit code (130: stopped, rerun to continue)."""
    print(f"study report: {result.out / 'report.md'}")
    print(f"study took {result.seconds:.0f} s (all calls: {result.time.get('seconds', result.seconds):.0f} s)")
    if getattr(result, "interrupted", None):
        say(f"the study stopped ({result.interrupted}): run the same command again to continue")
        return 130
    return 0
