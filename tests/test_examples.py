"""The shipped examples run as written."""

import pathlib
import runpy

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_every_method(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    for name in (
        "SAM",
        "ASAM",
        "FunctionalSAM",
        "PreconditionedSAM",
        "PreconditionedFunctionalSAM",
        "davda54",
        "BatchNorm: 2 running-statistics updates",
    ):
        assert name in out
