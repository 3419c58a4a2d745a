"""Server-side paths from clients are only honoured under configured roots."""

from __future__ import annotations

from pathlib import Path

from minehead.core.errors import InvalidArgument, NotFound, PermissionDenied


def resolve_allowed(path: str, roots: list[Path], *, must_exist: bool = True) -> Path:
    """Resolve `path` (symlinks followed) and check it lies under one of `roots`.

    PERMISSION_DENIED names the roots, so the user knows where to put the data.
    """
    if not path:
        raise PermissionDenied("empty path")
    p = Path(path).expanduser()
    resolved = p.resolve()
    for root in roots:
        root = root.resolve()
        if resolved == root or root in resolved.parents:
            if must_exist and not resolved.exists():
                raise NotFound(f"path {path!r} does not exist")
            return resolved
    raise PermissionDenied(
        f"path {path!r} is outside the allowed roots ({', '.join(str(r) for r in roots)}); "
        "start the server with --allowed-roots to add one"
    )


def image_ref_bytes(ref, roots: list[Path]) -> tuple[bytes, str]:
    """A common.v1.ImageRef -> (encoded bytes, label). Paths only under `roots`."""
    which = ref.WhichOneof("source")
    if which == "data":
        return ref.data, ref.label
    if which == "path":
        p = resolve_allowed(ref.path, roots)
        return p.read_bytes(), ref.label or p.name
    raise InvalidArgument(f"image {ref.label!r} has neither data nor path" if ref.label else "an image has neither data nor path")
