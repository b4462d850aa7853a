"""Fingerprints of model directories: resumable outputs record them and refuse to mix two models.

An evaluation or a tree file written with one reward model or policy must not be resumed with another (an
RM retrained between a kill and a resume would score half the episodes). :func:`model_fingerprint` digests a
model directory: every file's relative name and size, and its content. Files up to
:data:`FULL_DIGEST_BYTES` are digested whole; larger ones (8B weights) by their first and last MiB and
:data:`SAMPLES` MiB at evenly spaced offsets, which any retraining changes (every tensor moves) at a cost of
milliseconds instead of reading tens of GB. Hidden files and ``__pycache__`` are skipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_DIGEST_BYTES = 64 * 2**20
SAMPLES = 14
CHUNK = 2**20


def file_digest(path: Path) -> str:
    """sha256 of ``path``: whole up to :data:`FULL_DIGEST_BYTES`, else sampled (see the module doc)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_BYTES:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        else:
            offsets = [0, size - CHUNK] + [(size - CHUNK) * (i + 1) // (SAMPLES + 1) for i in range(SAMPLES)]
            for off in sorted(offsets):
                f.seek(off)
                h.update(f.read(CHUNK))
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """A 16-hex-digit fingerprint of a model file or directory (names, sizes and contents of its files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such model file or directory")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)
    )
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root).as_posix()
        h.update(f"{rel}\0{f.stat().st_size}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]
