"""Opt-in download of model weights (``wsi-nuclei models fetch NAME``).

Nothing in the package downloads on its own: the pipeline only reads weights that are already
on disk (``--weights PATH`` or the cache directory, see :func:`default_cache_dir`). This module
is the one place that talks to the network, and only when the user asks for it.

The download goes to a temporary name in the destination directory, its SHA-256 is checked
while streaming, and only a verified file is renamed to its final name, so an interrupted or
corrupted download never looks like a valid weights file.

This module does not import torch, so the CLI can fetch without paying for it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from wsi_nuclei._io import atomic_path
from wsi_nuclei.errors import ModelError

#: Environment variable that overrides the cache directory.
CACHE_ENV_VAR: Final[str] = "WSI_NUCLEI_HOME"

#: Short name of the official HoVer-Net PanNuke checkpoint (``wsi-nuclei models fetch NAME``).
HOVERNET_PANNUKE_NAME: Final[str] = "hovernet-pannuke"
#: File name the official release uses (and the cache uses).
HOVERNET_PANNUKE_FILENAME: Final[str] = "hovernet_fast_pannuke_type_tf2pytorch.tar"
#: Size in bytes of the official checkpoint.
HOVERNET_PANNUKE_SIZE: Final[int] = 150_996_114
#: SHA-256 of the official checkpoint.
HOVERNET_PANNUKE_SHA256: Final[str] = (
    "4a1463467737f81203a0513f794276cbcbbd6bb470969584f314167c6acef081"
)
#: Licence of the weights (inherited from the PanNuke data set).
HOVERNET_PANNUKE_LICENCE: Final[str] = "CC BY-NC-SA 4.0"
#: Google Drive file id of the checkpoint, as linked from the README of vqdang/hover_net
#: ("PanNuke checkpoint" under "Segmentation and Classification").
_HOVERNET_PANNUKE_DRIVE_ID: Final[str] = "1SbSArI3KOOWHxRlxnjchO7_MbWzB4lNR"
#: Human-facing page of the checkpoint (the link published in the official README).
HOVERNET_PANNUKE_PAGE_URL: Final[str] = (
    f"https://drive.google.com/file/d/{_HOVERNET_PANNUKE_DRIVE_ID}/view"
)
#: Direct-download form of the same Google Drive file. Files this large normally get a
#: "cannot scan for viruses" page on the plain ``uc?export=download`` link; ``confirm=t``
#: skips it. If Google changes this, :func:`fetch_weights` reports the web page it got and
#: points at :data:`HOVERNET_PANNUKE_PAGE_URL` for a manual download.
HOVERNET_PANNUKE_URL: Final[str] = (
    "https://drive.usercontent.google.com/download"
    f"?id={_HOVERNET_PANNUKE_DRIVE_ID}&export=download&confirm=t"
)

_CHUNK: Final[int] = 1 << 20
_USER_AGENT: Final[str] = "wsi-nuclei (weights fetch; python-urllib)"


@dataclass(frozen=True)
class WeightsSource:
    """Where a published weights file comes from and how to recognise it.

    Attributes
    ----------
    name : str
        Short name used on the command line.
    url : str
        Direct-download URL.
    page_url : str
        Page a person can open in a browser to download the file by hand.
    filename : str
        File name in the cache directory.
    sha256 : str
        Expected SHA-256 (lower-case hex).
    size : int
        Expected size in bytes.
    licence : str
        Licence of the weights.
    """

    name: str
    url: str
    page_url: str
    filename: str
    sha256: str
    size: int
    licence: str


#: Published weights that ``wsi-nuclei models fetch NAME`` knows about.
KNOWN_WEIGHTS: Final[dict[str, WeightsSource]] = {
    HOVERNET_PANNUKE_NAME: WeightsSource(
        name=HOVERNET_PANNUKE_NAME,
        url=HOVERNET_PANNUKE_URL,
        page_url=HOVERNET_PANNUKE_PAGE_URL,
        filename=HOVERNET_PANNUKE_FILENAME,
        sha256=HOVERNET_PANNUKE_SHA256,
        size=HOVERNET_PANNUKE_SIZE,
        licence=HOVERNET_PANNUKE_LICENCE,
    ),
}


def default_cache_dir() -> Path:
    """Directory where fetched weights are kept.

    Returns
    -------
    Path
        ``$WSI_NUCLEI_HOME`` when that variable is set and non-empty, else
        ``~/.cache/wsi-nuclei``. The directory is not created here.
    """
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "wsi-nuclei"


def default_weights_path(name: str = HOVERNET_PANNUKE_NAME) -> Path:
    """Path in the cache directory where the weights called ``name`` are expected.

    Parameters
    ----------
    name : str
        A key of :data:`KNOWN_WEIGHTS`.

    Returns
    -------
    Path
        ``default_cache_dir() / <file name of that checkpoint>``.

    Raises
    ------
    ModelError
        If ``name`` is not a known checkpoint.
    """
    try:
        source = KNOWN_WEIGHTS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_WEIGHTS))
        raise ModelError(f"unknown weights {name!r} (known: {known})") from None
    return default_cache_dir() / source.filename


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = _CHUNK) -> str:
    """SHA-256 of a file, read in chunks (constant memory).

    Parameters
    ----------
    path : str or PathLike
        File to hash.
    chunk_size : int
        Bytes read per call.

    Returns
    -------
    str
        Lower-case hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_weights(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str,
    *,
    timeout: float = 30,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download a weights file, verify its SHA-256 and move it into place.

    Parameters
    ----------
    url : str
        Where to download from (``https://``, ``http://`` or ``file://``).
    dest : str or PathLike
        Final path of the file (its directory is created if needed). If a file with the
        expected SHA-256 is already there, nothing is downloaded.
    sha256 : str
        Expected SHA-256 (hex, any case).
    timeout : float
        Seconds to wait for the connection and for each read.
    progress : callable, optional
        Called as ``progress(bytes_so_far, total_bytes_or_None)`` after each chunk.

    Returns
    -------
    Path
        ``dest``, now holding the verified file.

    Raises
    ------
    ModelError
        If the server cannot be reached or the transfer fails (offline), the server returns
        a web page instead of the file, the file's SHA-256 differs, or ``dest`` cannot be
        written. The message says how to place the file by hand.
    """
    dest = Path(dest).expanduser()
    expected = sha256.strip().lower()
    if dest.is_dir():
        raise ModelError(f"weights destination {dest} is a directory; give the file path")
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create weights directory {dest.parent}: {exc.strerror or exc}"
        ) from None

    manual = _manual_hint(url, dest)
    with atomic_path(dest) as tmp:
        got = _download(url, tmp, timeout=timeout, progress=progress, manual=manual)
        if got != expected:
            raise ModelError(
                f"downloaded weights from {url} have a sha256 mismatch (got {got}, expected "
                f"{expected}); {manual}"
            )
    return dest


def _manual_hint(url: str, dest: Path) -> str:
    """The one-line "how to do it by hand" advice appended to fetch errors."""
    page = url
    for source in KNOWN_WEIGHTS.values():
        if source.url == url:
            page = source.page_url
    return f"download it by hand from {page} and pass --weights PATH, or copy it to {dest}"


def _download(
    url: str,
    tmp: Path,
    *,
    timeout: float,
    progress: Callable[[int, int | None], None] | None,
    manual: str,
) -> str:
    """Stream ``url`` into ``tmp``; return the SHA-256 of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.sha256()
    done = 0
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (user-chosen URL)
    except urllib.error.HTTPError as exc:
        raise ModelError(
            f"cannot download weights from {url}: HTTP {exc.code} {exc.reason}; {manual}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot download weights from {url} (offline or unreachable: {_reason(exc)}); {manual}"
        ) from None
    with response:
        content_type = (response.headers.get("Content-Type") or "").lower()
        if content_type.startswith("text/html"):
            raise ModelError(
                f"{url} returned a web page instead of the weights file (the host may ask "
                f"for a confirmation in a browser); {manual}"
            )
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        try:
            out = open(tmp, "wb")
        except OSError as exc:
            raise ModelError(
                f"cannot write weights to {tmp.parent}: {exc.strerror or exc}"
            ) from None
        with out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.HTTPException, OSError) as exc:
                    raise ModelError(
                        f"download of {url} was interrupted after {done} bytes (offline or "
                        f"unreachable: {_reason(exc)}); {manual}"
                    ) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise ModelError(
                        f"cannot write weights to {tmp.parent}: {exc.strerror or exc}"
                    ) from None
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if total is not None and done != total:
        raise ModelError(
            f"download of {url} stopped after {done} of {total} bytes (connection lost); {manual}"
        )
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """A short, single-line description of a network error."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _reason(inner)
        return str(inner).splitlines()[0] if str(inner) else type(exc).__name__
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc)
    text = text.splitlines()[0] if text else ""
    return text or type(exc).__name__
