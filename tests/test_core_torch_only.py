"""The optimizer core and the diagnostics import and run with torch alone (pyproject: torch and
numpy are the only dependencies; the rest is the ``harness`` extra)."""

import subprocess
import sys
import textwrap

HARNESS_ONLY = ("transformers", "datasets", "accelerate", "matplotlib", "sklearn", "scipy", "safetensors", "tqdm")

SCRIPT = textwrap.dedent("""
    import importlib.abc
    import importlib.machinery
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ModuleNotFoundError(f"{spec.name} is blocked: the core must not need it", name=spec.name)

        def exec_module(self, module):
            pass

    class Block(importlib.abc.MetaPathFinder):
        # A spec without origin (torch's probes of installed packages skip it) whose import
        # raises ImportError.
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, Block())

    import torch
    import samlm
    import samlm.diagnostics
    import samlm.optim
    from samlm.optim import METHODS, SAM_FAMILY, build_optimizer

    def ce(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch[1])

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    for name in SAM_FAMILY:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        opt = build_optimizer(name, model.parameters(), lr=1e-2)
        assert isinstance(opt.base_optimizer, torch.optim.AdamW) and opt.rho == METHODS[name].default_rho
        stats = opt.train_step(batch, lambda b: model(b[0]), ce, split=True)
        assert not stats.skipped and stats.loss_perturbed == stats.loss_perturbed and stats.logit_path_norm is not None, name
        assert samlm.optim.train_step(opt, batch, lambda b: model(b[0]), ce).loss_perturbed > 0
    out = samlm.diagnostics.measure_sharpness(model, batch, lambda b: model(b[0]), ce, iters=3)
    assert out["hessian_lambda_max"] == out["hessian_lambda_max"]
    loaded = {m.partition(".")[0] for m in sys.modules}
    assert not loaded & BLOCKED, loaded & BLOCKED
    print("ok")
""")


def test_core_and_diagnostics_need_only_torch():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(HARNESS_ONLY)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_hf_adafactor_registers_its_preconditioner_lazily():
    """Importing samlm does not import transformers; its Adafactor, once used, is read by
    preconditioned SAM (ε scaled by 1/√v̂), without any registration by the user."""
    script = textwrap.dedent("""
        import sys
        import torch
        import samlm
        assert "transformers" not in sys.modules
        from transformers.optimization import Adafactor
        from samlm.optim.preconditioners import Preconditioners

        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        base = Adafactor(model.parameters(), lr=1e-2, scale_parameter=False, relative_step=False)
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt = samlm.PreconditionedSAM(base, rho=0.05)
        for _ in range(2):
            opt.train_step((x, y), lambda b: model(b[0]), lambda o, b: torch.nn.functional.cross_entropy(o, b[1]))
        assert Preconditioners(base, list(model.parameters())).available
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_cli_without_the_harness_extra_says_what_to_install():
    """``pip install samlm`` (torch only) has the ``samlm`` command; a command that needs the
    harness extra ends in one line naming it, not a traceback."""
    script = SCRIPT.split("import torch\n", 1)[0] + textwrap.dedent("""
        from samlm import cli
        code = cli.main(["pretrain", "--steps", "1"])
        print("exit", code)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script, ",".join(HARNESS_ONLY)], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip() == "exit 2", result.stderr
    assert result.stderr.count("\n") == 1 and "pip install 'samlm[harness]'" in result.stderr, result.stderr
