"""Safe writes: every file goes to a temporary name beside its target and is moved into place
(``os.replace``), so an interrupted run leaves the old file or the new one, never half of one;
shipped ``data/`` is written only on request (``--force``); JSON holds ``null``, never ``NaN``."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from .paths import data_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, else delete it.

    ``suffix`` keeps an extension some writers insist on (e.g. ``.safetensors``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success swap it in for ``path``.

    Whatever the writer puts in the folder (``save_pretrained`` output, several files) appears
    at ``path`` together; an exception or interruption leaves the old folder untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf and refuses anything else non-JSON."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as valid JSON (``null`` for NaN/inf) to ``path`` atomically."""
    return write_text(path, dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any | None:
    """The JSON in ``path``, or ``None`` with a warning when it is missing, truncated or invalid."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable {what} {path}: {type(exc).__name__}: {exc}", RuntimeWarning,
                      stacklevel=2)
        return None


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_out(path: str | os.PathLike, *, force: bool = False, flag: str = "--out") -> Path:
    """Validate an output location before any compute: refuse shipped ``data/`` without
    ``force``, create the folder (or the file's folder) and check it is writable."""
    path = Path(path)
    if _inside(path, data_dir()) and not force:
        raise SystemExit(f"{flag} {path} is inside the shipped data/ folder; pass --force to overwrite "
                         "shipped files (default outputs go to outputs/)")
    folder = path if path.suffix == "" else path.parent
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{flag} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):
            pass
    except OSError as exc:
        raise SystemExit(f"{flag} {folder} is not writable: {exc.strerror or exc}") from None
    return path
