"""Crash-safe file writing and checkpoints.

Everything a run writes goes through this module, so that a crash (power loss, OOM kill,
``kill -9``) at any moment leaves either the old file or the new file, never a mix.

Atomic writes
    ``atomic_write_bytes/text/json`` write a temp file in the destination's directory,
    flush + fsync it, ``os.replace`` it over the destination and fsync the directory so the
    rename itself is durable.

JSON lines (``metrics.jsonl``)
    ``append_jsonl`` appends one line and fsyncs (O(1) per record; an atomic rewrite would be
    O(file) per record). A crash during the append can therefore leave at most a *torn last
    line*. ``read_jsonl`` drops a torn last line (with a warning) and never returns half a
    record, and the next ``append_jsonl`` cuts the torn tail off before writing. A corrupt line
    in the *middle* of the file cannot come from a crash and raises ``UserError``.
    ``write_jsonl`` rewrites a whole file atomically (used to truncate on resume).

Checkpoints
    ``save_checkpoint(root, step, model_state, extra_state)`` writes::

        root/checkpoint-<step>/
            model.safetensors   weights (shared/tied tensors stored once, aliases in metadata)
            state.pt            everything else: torch.save of plain dicts/lists/numbers/
                                strings/tensors, loaded only with torch.load(weights_only=True)
            manifest.json       {"format", "version", "step", "files": {name: {sha256, bytes}}}

    The checkpoint is assembled in a hidden temp directory (``.tmp-checkpoint-<step>-<pid>``)
    and renamed into place, and ``manifest.json`` is written last, so a directory named
    ``checkpoint-<step>`` with a manifest whose hashes match is complete by construction.
    ``load_latest_checkpoint`` verifies manifests and hashes newest first, warns about each bad
    checkpoint (naming it and why) and falls back to the previous good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from samlm.errors import UserError

log = logging.getLogger("samlm")

PathLike = str | os.PathLike

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FORMAT = "samlm-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
_ALIASES_METADATA_KEY = "samlm.aliases"
_CHECKPOINT_DIR_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class NonFiniteWeightsError(UserError):
    """Refused to save weights containing NaN or Inf."""


class CheckpointError(Exception):
    """A checkpoint on disk is incomplete or corrupted (the message says why)."""


# --------------------------------------------------------------------------- atomic writes


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore, once at import
    os.umask(mask)
    return mask


_DEFAULT_FILE_MODE = 0o666 & ~_read_umask()


def fsync_dir(directory: PathLike) -> None:
    """Make a rename/creation inside ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates files as 0600; give the result the permissions a plain open() would.
        os.chmod(tmp_name, path.stat().st_mode & 0o7777 if path.exists() else _DEFAULT_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomic JSON write; tensors/numpy scalars become numbers, NaN/Inf become strings."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=indent) + "\n")


def atomic_save_pretrained(obj: Any, directory: PathLike) -> None:
    """``obj.save_pretrained`` (a Hugging Face tokenizer, config or model) into ``directory``
    atomically: written into a hidden temp sibling, each file fsynced, then renamed into place
    (an existing directory is moved aside first). A crash leaves the old directory or the new one."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        obj.save_pretrained(str(tmp))
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_safe(obj: Any) -> Any:
    """Plain-JSON version of ``obj``: tensors/numpy scalars to numbers, NaN/Inf to strings.

    Strict JSON has no NaN; writing "nan" keeps files readable by any JSON parser.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)  # "nan", "inf", "-inf"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


# --------------------------------------------------------------------------- JSON lines


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line and fsync it.

    If a previous crash left a torn last line (no trailing newline), it is cut off first so
    the new record starts on a line of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(json_safe(record)) + "\n").encode("utf-8")
    existed = path.exists()
    with open(path, "ab") as f:
        _cut_torn_tail(f)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if not existed:
        fsync_dir(path.parent)


def _cut_torn_tail(f) -> None:
    """Truncate an append-mode file back to just after its last newline."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(f.name, "rb") as reader:
        reader.seek(size - 1)
        if reader.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last newline.
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            reader.seek(start)
            block = reader.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                f.truncate(start + idx + 1)
                return
            pos = start
    f.truncate(0)


def read_jsonl(path: PathLike) -> list[dict]:
    """All complete records of a JSON-lines file (``[]`` if it does not exist).

    A torn or unparsable *last* line (what a crash mid-append leaves) is dropped with a
    warning. A bad line elsewhere means the file was damaged otherwise: ``UserError``.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn_tail = lines.pop()  # b"" when the file ends with a newline
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if number == len(lines) and not torn_tail:
                log.warning("%s: dropping unreadable last line %d (%s)", path, number, exc)
                continue
            raise UserError(f"{path}: line {number} is not valid JSON ({exc})") from None
    if torn_tail.strip():
        log.warning("%s: dropping torn last line (no newline; an interrupted write)", path)
    return records


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file atomically with ``records``."""
    text = "".join(json.dumps(json_safe(r)) + "\n" for r in records)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) RNG states as plain lists/ints/tensors.

    The result survives ``torch.save`` + ``torch.load(weights_only=True)``.
    """
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint has CUDA RNG state for %d devices, this machine has %d: not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A verified checkpoint loaded from disk."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    extra_state: dict
    # Newer checkpoints that were skipped because they are bad: (path, reason).
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def checkpoint_dirs(root: PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(
    root: PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    extra_state: Mapping[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write ``root/checkpoint-<step>/`` atomically and keep only the newest ``keep``.

    Raises ``NonFiniteWeightsError`` (nothing written) if any weight is NaN/Inf, and
    ``TypeError`` if ``extra_state`` holds something ``torch.load(weights_only=True)`` refuses.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _check_finite(model_state, step)
    _check_weights_only_safe(extra_state, "extra_state")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)

    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_weights(model_state, tmp / WEIGHTS_FILE)
        _save_state(dict(extra_state), tmp / STATE_FILE)
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": int(step),
            "files": {name: _file_digest(tmp / name) for name in (WEIGHTS_FILE, STATE_FILE)},
        }
        # The manifest goes last: its presence (with matching hashes) marks a complete checkpoint.
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        # Re-saving a step (e.g. after falling back from a corrupted checkpoint): move the old
        # one aside first, since a directory cannot be renamed over a non-empty one.
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _remove_stale_temp_dirs(root: Path) -> None:
    """Temp/trash directories left by a crash mid-save are never valid: delete them."""
    for entry in root.iterdir():
        if entry.is_dir() and (entry.name.startswith(".tmp-") or entry.name.startswith(".trash-")):
            shutil.rmtree(entry, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    for _, path in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _check_finite(model_state: Mapping[str, torch.Tensor], step: int) -> None:
    bad = [
        name
        for name, t in model_state.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(
            f"refusing to save checkpoint at step {step}: non-finite (NaN/Inf) weights in {shown}"
        )


_WEIGHTS_ONLY_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Fail early (with the offending key path) on values weights_only loading would reject."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _WEIGHTS_ONLY_SCALARS):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} cannot be saved")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) cannot load; "
        "convert it to tensors, dicts, lists, numbers or strings"
    )


def _save_weights(model_state: Mapping[str, torch.Tensor], path: Path) -> None:
    tensors, aliases = _dedup_shared(model_state)
    save_file(tensors, str(path), metadata={_ALIASES_METADATA_KEY: json.dumps(aliases)})
    _fsync_file(path)


def _dedup_shared(model_state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a state dict into unique tensors + ``{alias: stored_name}``.

    safetensors refuses tensors that share memory (tied embeddings). Identical views are
    stored once and recorded as aliases; other overlapping views are cloned.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[int] = set()
    for name, tensor in model_state.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device")
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        view_key = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if storage is not None and view_key in seen_views:
            aliases[name] = seen_views[view_key]
            continue
        shares_memory = storage is not None and storage in seen_storages
        if storage is not None:
            seen_views[view_key] = name
            seen_storages.add(storage)
        tensor = tensor.to("cpu")
        tensors[name] = tensor.clone() if shares_memory or not tensor.is_contiguous() else tensor
    return tensors, aliases


def _save_state(extra_state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(extra_state, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def verify_checkpoint(path: PathLike) -> dict:
    """Check a checkpoint's manifest, file sizes and sha256; return the manifest.

    Raises ``CheckpointError`` with a short reason if anything is missing or differs.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError("no manifest.json (incomplete save)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"manifest.json is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("manifest.json is not a samlm checkpoint manifest")
    match = _CHECKPOINT_DIR_RE.match(path.name)
    if match and int(match.group(1)) != manifest.get("step"):
        raise CheckpointError(f"manifest says step {manifest.get('step')}, directory says {match.group(1)}")
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{name} is truncated or resized ({size} bytes, expected {expected['bytes']})")
        if _file_digest(file)["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{name} is corrupted (sha256 mismatch)")
    if set(manifest.get("files", {})) != {WEIGHTS_FILE, STATE_FILE}:
        raise CheckpointError(f"manifest lists {sorted(manifest.get('files', {}))}, expected weights and state")
    return manifest


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load one checkpoint directory (``CheckpointError`` if it is bad)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        model_state = _load_weights(path / WEIGHTS_FILE, map_location)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{WEIGHTS_FILE} cannot be read ({exc})") from None
    try:
        extra_state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{STATE_FILE} cannot be read ({exc})") from None
    return Checkpoint(path=path, step=int(manifest["step"]), model_state=model_state, extra_state=extra_state)


def _load_weights(path: Path, map_location) -> dict[str, torch.Tensor]:
    device = str(map_location)
    with safe_open(str(path), framework="pt", device=device) as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_METADATA_KEY, "{}"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    return tensors


def load_latest_checkpoint(root: PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Newest good checkpoint under ``root``, skipping (and warning about) bad newer ones.

    Raises ``UserError`` if there is no checkpoint, or none is good.
    """
    root = Path(root)
    candidates = checkpoint_dirs(root)
    if not candidates:
        raise UserError(f"no checkpoint found in {root}")
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(candidates):
        try:
            checkpoint = load_checkpoint(path, map_location)
        except CheckpointError as exc:
            log.warning("checkpoint %s is unusable: %s; trying the previous one", path, exc)
            skipped.append((path, str(exc)))
            continue
        checkpoint.skipped = skipped
        return checkpoint
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise UserError(f"no usable checkpoint in {root} ({reasons})")
