"""Read a tensor file written by ``torch.save`` without importing torch (about 50 ms instead of ~2 s).

Commands check their vector files (shape, finiteness) before torch, Lightning or a model loads, so a bad
file is answered at once. The reader allows exactly what ``torch.load(weights_only=True)`` allows for a
single dense tensor — the tensor-rebuild function and the storage types — and refuses any other pickled
object, so it is as safe. Formats it does not know (the pre-1.6 non-zip format, exotic dtypes) return
None and the caller falls back to ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
}


class NotATensorFile(ValueError):
    pass


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise NotATensorFile(f"it pickles {module}.{name}, which a tensor file never does")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise NotATensorFile(f"unknown storage record {pid!r}")
        dtype = _STORAGE_DTYPES[pid[1]]
        raw = self.archive.read(f"{self.prefix}data/{pid[2]}")
        if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into float32's upper half
            return np.frombuffer(raw, dtype="<u2").astype(np.uint32).__lshift__(16).view(np.float32)
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def _rebuild(storage: np.ndarray, offset: int, size, stride, *_ignored):
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).astype(np.float32)


def read_tensor_array(path: str | Path) -> np.ndarray | None:
    """The float32 array in a ``torch.save`` file; None for a format this reader does not know.

    Raises :class:`NotATensorFile` (a ValueError) for a file that is not a plain tensor (empty,
    truncated, a pickled object, a dict of tensors).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise NotATensorFile("the file is empty")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            magic = handle.read(2)
        if magic == b"\x80\x02":  # torch's legacy (pre-1.6) format: let torch read it
            return None
        raise NotATensorFile("it is not a torch.save file (truncated, or another format)")
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(names) != 1:
            raise NotATensorFile("the archive has no single data.pkl (truncated?)")
        prefix = names[0][: -len("data.pkl")]
        try:
            value = _Unpickler(archive.read(names[0]), archive, prefix).load()
        except NotATensorFile:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            KeyError,
            zipfile.BadZipFile,
            ValueError,
            TypeError,
        ) as error:
            raise NotATensorFile(f"it could not be read ({error})") from None
    if not isinstance(value, np.ndarray):
        raise NotATensorFile(f"it holds a {type(value).__name__}, not one tensor")
    return value
