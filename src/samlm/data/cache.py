"""The cache of prepared data: a raw ``--data`` spec is prepared once (:mod:`samlm.data.writer`)
into ``prepared/<key>`` under :func:`cache_root`, keyed by (source, tokenizer, split rule, budget),
and every later run with the same spec maps that entry. The entry's lock serialises processes
and ranks that ask for it at once: the second waits and then reuses it."""

from __future__ import annotations

import os
from pathlib import Path

from samlm.data.sources import open_source
from samlm.data.store import META_FILE, PreparedTokens, is_prepared_dir, load_prepared
from samlm.data.tokenizers import DEFAULT_BPE_TRAIN_CHARS, parse_bpe, tokenizer_sha256
from samlm.data.writer import Budget, identity_key, prepare, prepare_identity
from samlm.errors import UserError


def cache_root() -> Path:
    """``$SAMLM_CACHE``, else ``$XDG_CACHE_HOME/samlm``, else ``~/.cache/samlm``."""
    if os.environ.get("SAMLM_CACHE"):
        return Path(os.environ["SAMLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "samlm"


def ensure_prepared(
    spec: str | os.PathLike,
    tokenizer: str = "bytes",
    *,
    budget: Budget | None = None,
    max_chars: int | None = None,
    workers: int = 1,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> PreparedTokens:
    """The prepared tokens of a ``--data`` spec: a prepared directory as it is, or a raw spec
    prepared once into the cache (module docstring)."""
    if is_prepared_dir(spec):
        return load_prepared(spec)
    budget = budget or Budget()
    source = open_source(spec, max_chars=max_chars)
    bpe = parse_bpe(tokenizer)
    sha = None if bpe else tokenizer_sha256(tokenizer, trust_remote_code=trust_remote_code)
    identity = prepare_identity(source, tokenizer, sha, budget, DEFAULT_BPE_TRAIN_CHARS if bpe else None)
    directory = cache_root() / "prepared" / identity_key(identity)
    prepared = _complete(directory, identity)
    if prepared is not None:
        return prepared
    prepare(
        spec,
        directory,
        tokenizer=tokenizer,
        budget=budget,
        workers=workers,
        max_chars=max_chars,
        bpe_train_chars=DEFAULT_BPE_TRAIN_CHARS,
        trust_remote_code=trust_remote_code,
        progress=progress,
        # another process may have completed it since: then it is reused, not prepared again
        overwrite=(directory / META_FILE).exists() and _complete(directory, identity) is None,
    )
    return load_prepared(directory)


def _complete(directory: Path, identity: dict) -> PreparedTokens | None:
    """The cache entry, complete and of this identity (None: prepare it; a damaged one is prepared again)."""
    try:
        prepared = load_prepared(directory)
    except UserError:
        return None
    return prepared if prepared.meta.get("identity") == identity else None
