"""Run one of the papers' studies: pretrain (Singh et al. 2025) or finetune (Bahri et al. 2022)."""

from __future__ import annotations

import argparse

from samlm.harness import settings
from samlm.progress import say

STUDIES = ("pretrain", "finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="study", metavar="STUDY", parser_class=type(parser))
    from samlm.studies import pretrain_study

    pretrain = sub.add_parser("pretrain", help="Functional-SAM / preconditioned SAM vs AdamW: sizes x methods, "
                              "tuned (lr, rho), seeds, equal steps and equal compute, sharpness",
                              description=pretrain_study.__doc__.strip().splitlines()[0])
    pretrain.add_argument("--preset", default="cpu", choices=tuple(pretrain_study.PRESETS),
                          help="cpu (this kind of machine; docs/results.md has its time), gpu-24m, gpu-118m")
    _common(pretrain, "runs/study-pretrain")
    pretrain.add_argument("--optimizers", default=",".join(pretrain_study.STUDY_OPTIMIZERS),
                          help="comma-separated methods (must include adamw)")
    pretrain.add_argument("--sweep-seeds", default=None, help="comma-separated seeds of the sweep (default the preset's)")
    pretrain.set_defaults(_study_run=_run_pretrain)

    from samlm.studies import finetune_study

    finetune = sub.add_parser("finetune", help="SAM / Functional-SAM vs the baseline optimizer when fine-tuning on "
                              "subsampled data: rho sweep, fractions, seeds, step budgets, best checkpoints",
                              description=finetune_study.__doc__.strip().splitlines()[0])
    finetune.add_argument("--preset", default="cpu", choices=tuple(finetune_study.PRESETS),
                          help="cpu (all-MiniLM-L6-v2 on WiC; docs/results.md has its time), gpu-t5-base")
    _common(finetune, "runs/study-finetune")
    finetune.add_argument("--model", default=None, help="model directory or hub id instead of the preset's")
    finetune.add_argument("--model-label", default=None, help="the model's name in the reports")
    finetune.add_argument("--data-dir", default=None, help="the task's official files (default the preset's)")
    finetune.set_defaults(_study_run=_run_finetune)


def _common(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--out", default=out, help=f"study directory (default {out})")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds of the final runs (default the preset's)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default the preset's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run instead of the preset's budget (a quick look)")
    parser.add_argument("--overwrite", action="store_true", help="rerun finished runs too")
    parser.add_argument("--dry-run", action="store_true", help="print the sizes, grids and runs; write nothing")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_study_run", None) is None:
        from samlm.errors import UserError

        raise UserError("samlm study needs a study: " + " or ".join(STUDIES))
    for flag, value in (("--steps", args.steps), ("--jobs", args.jobs)):
        if value is not None:
            settings.positive_int(flag, value)
    return args._study_run(args)


def _run_pretrain(args: argparse.Namespace) -> int:
    from samlm.studies.pretrain_study import PRESETS, PretrainStudy, run_study
    from samlm.studies.grid import parse_seeds
    from samlm.harness.pretrain import validate

    study = PretrainStudy(out=args.out, preset=PRESETS[args.preset], optimizers=args.optimizers.split(","),
                          seeds=None if args.seeds is None else parse_seeds(args.seeds),
                          sweep_seeds=None if args.sweep_seeds is None else parse_seeds(args.sweep_seeds),
                          jobs=args.jobs, steps=args.steps, overwrite=args.overwrite)
    if args.dry_run:
        total = 0
        for size in study.preset.sizes:
            sweep = study.sweep(size).runs()
            for planned in sweep:
                validate(planned.config)
            total += len(sweep)
            print(f"{size.name}: {size.layers} layers x {size.width} wide, {size.heads} heads: sweep {len(sweep)} runs "
                  f"-> {study.sweep(size).out}, then each method's tuned point on seeds "
                  f"{','.join(map(str, study.seeds or study.preset.seeds))} at equal steps and equal compute "
                  f"-> {str(study.sweep(size).out)[:-len('sweep')]}final")
        say(f"dry run: {total} sweep runs are fine; nothing was written")
        return 0
    result = run_study(study)
    print(f"study report: {result.out / 'report.md'}")
    print(f"study took {result.seconds:.0f} s")
    if result.interrupted:
        say(f"the study stopped ({result.interrupted}): run the same command again to continue")
        return 130
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from samlm.harness.finetune import prepare
    from samlm.studies.finetune_study import PRESETS, FinetuneStudy, run_study
    from samlm.studies.grid import parse_seeds

    study = FinetuneStudy(out=args.out, preset=PRESETS[args.preset], model=args.model, model_label=args.model_label,
                          data_dir=args.data_dir, seeds=None if args.seeds is None else parse_seeds(args.seeds),
                          jobs=args.jobs, steps=args.steps, overwrite=args.overwrite)
    if args.dry_run:
        runs = study.sweep().runs()
        for name, config, _ in runs:
            prepare(dataclasses.replace(config, dry_run=True, overwrite=True))
            print(f"{name}: {config.out} ({config.steps} steps)")
        print(f"then each SAM-family method at its chosen rho at data fractions "
              f"{','.join(f'{f:g}' for f in study.preset.fractions)}; step budgets {study.budgets}")
        say(f"dry run: {len(runs)} sweep runs are fine; nothing was written")
        return 0
    result = run_study(study)
    print(f"study report: {result.out / 'report.md'}")
    print(f"study took {result.seconds:.0f} s")
    return 0
