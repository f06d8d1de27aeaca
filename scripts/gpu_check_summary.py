"""Summarise `make gpu-check`'s outputs into OUT/summary.md (and print it): the figures for
docs/benchmarks.md and whether each target holds."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
bench = json.loads((out / "bench.json").read_text())
every5 = json.loads((out / "bench-every5.json").read_text())
small = json.loads((out / "bench-small.json").read_text())
lines = [
    f"# samlm gpu-check ({bench['config']['machine']}, torch {bench['config']['torch']})",
    "",
    f"bench at {bench['config']['layers']}L/{bench['config']['width']}d, batch "
    f"{bench['config']['batch']}x{bench['config']['context']}, {bench['config']['dtype']}:",
    "",
    "| method | step (s) | x AdamW | floor | x AdamW, --sam-every 5 |",
    "|---|---:|---:|---:|---:|",
]
for name, row in bench["methods"].items():
    k5 = every5["methods"].get(name, {}).get("ratio", "–")
    lines.append(f"| {name} | {row['step_s']} | {row['ratio']} | {row['floor']} | {k5} |")
checks = [
    ("SAM <= 1.25x AdamW", bench["methods"].get("sam", {}).get("ratio", 99) <= 1.25),
    ("F-SAM <= 1.55x AdamW", bench["methods"].get("fsam", {}).get("ratio", 99) <= 1.55),
]
runs = {}
for name in ("pretrain-fsam", "pretrain-adamw", "pretrain-sam-fp16", "torchrun-fsam"):
    summary = json.loads((out / name / "summary.json").read_text())
    runs[name] = summary
    lines.append(
        f"- {name}: completed {summary.get('completed')}, val loss {summary.get('val_loss', float('nan')):.4f}, "
        f"{summary.get('tokens_per_s') or 0:.0f} tokens/s"
    )
bare = small["methods"]["adamw"]["step_s"]
tokens_per_step = small["config"]["batch"] * small["config"]["context"]
harness = runs["pretrain-adamw"].get("tokens_per_s") or 0
ratio = harness / (tokens_per_step / bare)
lines.append(
    f"- samlm pretrain AdamW {harness:.0f} tokens/s vs bench's bare loop {tokens_per_step / bare:.0f}: {ratio:.3f}"
)
checks.append(("pretrain AdamW within 10% of the bare loop", ratio >= 0.9))
checks += [(f"{name} completed", bool(s.get("completed"))) for name, s in runs.items()]
lines += ["", "| target | holds |", "|---|---|"] + [f"| {t} | {'yes' if ok else 'NO'} |" for t, ok in checks]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
