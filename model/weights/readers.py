"""Pure readers: a file path in, a flat dict of tensors out. Nothing in a file is executed."""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import shown
from ..errors import CheckpointError, first_line

# Dicts that training scripts wrap a state dict in, most preferred first.
# DINO releases the teacher; EMA weights are what timm evaluates.
STATE_DICT_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "teacher", "module")
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


# What a file may hold once inflated or viewed, against its size on disk. Trained float weights barely
# compress (a savez_compressed .npz is ~90% of the raw size; .pth and .safetensors are stored raw),
# so more than 8 times the file plus 64 MiB (room for small, zero-heavy test checkpoints) is a
# compression bomb (a 3 MB .npz of one deflated 800 M-float member of zeros) or tensors that alias
# one storage many times; it is refused from the zip directory or the tensors' declared sizes,
# before anything of that size is allocated.
MAX_INFLATION = 8
INFLATION_SLACK = 64 * 2**20
MAX_TENSORS = 1 << 16  # a state dict has hundreds to a few thousand; a zip directory may claim millions
NPY_MAX_HEADER = 10_000  # numpy's own default limit on an .npy header
NPY_READ_CHUNK = 16 * 2**20


def inflation_budget(file_size: int) -> int:
    """The bytes a file of file_size bytes may hold once read (see MAX_INFLATION)."""
    return MAX_INFLATION * file_size + INFLATION_SLACK


def _check_zip_directory(p: Path) -> list[zipfile.ZipInfo]:
    """The members of a zip (an .npz or a PyTorch .pth/.bin), their declared uncompressed sizes
    (from the central directory: nothing is inflated yet) checked against the file's size."""
    with zipfile.ZipFile(p) as z:
        infos = z.infolist()
    if len(infos) > MAX_TENSORS:
        raise CheckpointError(f"{p.name} has {len(infos)} archive members; at most {MAX_TENSORS} are accepted")
    if sum(i.file_size for i in infos) > inflation_budget(p.stat().st_size):
        raise CheckpointError(
            f"{p.name}: its archive members would inflate to more than {MAX_INFLATION} times the file's "
            "size; refusing a possible compression bomb"
        )
    return infos


def _npy_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npy member: its header's shape x dtype must be what the directory declares for the
    member, so that the array allocated for it is never larger than the (budgeted) member."""
    key = info.filename.removesuffix(".npy")
    with z.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=NPY_MAX_HEADER)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=NPY_MAX_HEADER)
        except ValueError:
            raise CheckpointError(f"{name}: member {shown(info.filename)} is not a NumPy .npy array") from None
        if dtype.hasobject:
            raise CheckpointError(f"{name} holds pickled Python objects; refusing to load them (they could run code)")
        count = math.prod(shape)
        header = f.tell()
        if header + count * dtype.itemsize != info.file_size:
            raise CheckpointError(
                f"{name}: array {shown(key)} declares a shape and dtype that do not match its size in the archive"
            )
        buf = bytearray(count * dtype.itemsize)
        view, at = memoryview(buf), 0
        while at < len(buf):  # in pieces: a zip member's readinto would read the whole into a copy first
            n = f.readinto(view[at : at + NPY_READ_CHUNK])
            if not n:
                raise CheckpointError(f"{name}: array {shown(key)} is truncated")
            at += n
    arr = np.frombuffer(buf, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr


def read_npz(path: str | Path) -> dict[str, Tensor]:
    """A NumPy .npz (Google/big_vision layout, keys joined with '/'). Object arrays are refused; the
    members' declared sizes are checked against the file before any is inflated."""
    p = Path(path)
    try:
        infos = _check_zip_directory(p)
        out = {}
        with zipfile.ZipFile(p) as z:
            for info in infos:
                k = info.filename.removesuffix(".npy")
                arr = _npy_member(z, info, p.name)
                if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:  # big_vision saves bfloat16 as void
                    out[k] = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16).float()
                    continue
                if arr.dtype.kind not in "fiub":
                    raise CheckpointError(f"{p.name}: array {shown(k)} has dtype {arr.dtype}, not numeric")
                if not arr.dtype.isnative:
                    arr = arr.astype(arr.dtype.newbyteorder("="))
                out[k] = torch.from_numpy(np.ascontiguousarray(arr))
            return out
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{p.name} is not a readable .npz file ({type(e).__name__})") from None


def read_torch(path: str | Path) -> dict[str, Tensor]:
    """A PyTorch .pth/.bin, unpickled with weights_only=True (tensors and plain containers only)."""
    name = Path(path).name
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch's own test for its zip format
    if is_zip:
        # torch inflates a deflated storage record in full: the declared sizes are checked first
        _check_zip_directory(Path(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(
            f"{name} contains Python objects other than tensors; refusing to unpickle it "
            f"(that could run code). Details: {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError) as e:
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint: {first_line(e)}") from None
    return _flatten_state_dict(obj, name)


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """A .safetensors file; the header is checked against the file size before anything is read."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    _check_safetensors_header(p)
    try:
        # tensors from safetensors map the file; a clone each makes the weights our own memory, so
        # that a file rewritten while the model is in use cannot change it (or crash the server)
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p.name} is not a readable safetensors file: {first_line(e)}") from None


# A few well-known starts of files that get a .safetensors name by mistake.
_KNOWN_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .pth/.bin or a NumPy .npz?)"),
    (b"\x1f\x8b", "a gzip archive"),
    *((bytes([0x80, proto]), "a Python pickle (a legacy PyTorch checkpoint?)") for proto in range(2, 6)),
)


def _not_safetensors(name: str, head: bytes) -> CheckpointError:
    """The error for a file that does not begin as a safetensors file does; no file bytes in it."""
    kind = next((what for magic, what in _KNOWN_MAGIC if head.startswith(magic)), None)
    if kind is None and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "text"
    why = f"it looks like {kind}" if kind else "it does not begin with a safetensors header"
    return CheckpointError(
        f"{name} is not a safetensors file: {why} (a safetensors file begins with an 8-byte header "
        "length and then a JSON header starting with '{')"
    )


def _check_safetensors_header(p: Path) -> None:
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 8:
            raise CheckpointError(f"{p.name} is too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{":  # the format requires the JSON header to start right there with '{'
            raise _not_safetensors(p.name, head)
        # the length comes from the file's first bytes: never echoed (they may be someone's secret)
        if n > size - 8:
            raise CheckpointError(
                f"{p.name} is truncated or not a safetensors file: its header length is larger than the file"
            )
        if n > SAFETENSORS_MAX_HEADER:
            raise CheckpointError(
                f"{p.name}: its safetensors header is longer than the {SAFETENSORS_MAX_HEADER // 2**20} MiB accepted"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: [[[[... nested
            raise CheckpointError(f"{p.name} is not a valid safetensors file: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p.name} is not a valid safetensors file: its header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:  # + __metadata__; refused before a tensor is made for each entry
        raise CheckpointError(f"{p.name} lists {len(header)} tensors; at most {MAX_TENSORS} are accepted")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = int(info["data_offsets"][1])
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{p.name}: safetensors entry {key!r} has no valid data_offsets") from None
        if 8 + n + end > size:
            raise CheckpointError(
                f"{p.name} is truncated: tensor {key!r} ends at byte {8 + n + end} but the file has {size}"
            )


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Dispatch on content (magic bytes), not on the file name."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such checkpoint file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{p.name} cannot be read ({e.strerror or type(e).__name__})") from None
    if not magic:
        raise CheckpointError(f"{p.name} is empty")
    if p.suffix == ".npz" or (magic[:2] == b"PK" and _is_npz(p)):
        reader = read_npz
    elif p.suffix == ".safetensors" or _looks_like_safetensors(magic):
        reader = read_safetensors
    else:
        reader = read_torch
    # One boundary around every reader: whatever a hostile file makes a library raise (torch's
    # unpickler has raised IndexError and KeyError on a text file) becomes one CheckpointError
    # that names the file, never a traceback, and never the file's content.
    try:
        tensors = reader(p)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the one place that turns any reader failure into a message
        raise CheckpointError(f"{p.name} could not be read as a checkpoint ({type(e).__name__})") from None
    return _check_tensors(tensors, p)


def _check_tensors(tensors: dict[str, Tensor], p: Path) -> dict[str, Tensor]:
    """Only plain dense tensors: no sparse, quantized or meta tensors (they pass the unpickler and
    fail later), and none expanded from a smaller storage (a stride-0 tensor of a few bytes in the
    file that would take gigabytes once made contiguous). Their sizes together must fit the file's
    inflation budget: many tensors viewing one storage would each become a copy when converted."""
    if len(tensors) > MAX_TENSORS:
        raise CheckpointError(f"{p.name} holds {len(tensors)} tensors; at most {MAX_TENSORS} are accepted")
    total = 0
    for k, t in tensors.items():
        if t.layout != torch.strided or t.is_meta or t.is_quantized:
            kind = "meta" if t.is_meta else "quantized" if t.is_quantized else str(t.layout).replace("torch.", "")
            raise CheckpointError(f"{p.name}: tensor {shown(k)} is a {kind} tensor; only dense tensors are supported")
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise CheckpointError(
                f"{p.name}: tensor {shown(k)} is expanded from a smaller storage (a zero stride); "
                "save it with .contiguous() or .clone()"
            )
        total += t.numel() * t.element_size()
    if total > inflation_budget(p.stat().st_size):
        raise CheckpointError(
            f"{p.name}: its tensors add up to more than {MAX_INFLATION} times the file's size "
            "(tensors sharing one storage?); refusing to copy them"
        )
    return tensors


def _is_npz(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _looks_like_safetensors(magic: bytes) -> bool:
    """An 8-byte little-endian header length, then the JSON header, which starts with '{'."""
    if len(magic) < 9:
        return False
    (n,) = struct.unpack("<Q", magic[:8])
    return 2 <= n <= SAFETENSORS_MAX_HEADER and magic[8:9] == b"{"


def _flatten_state_dict(obj, name: str) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in STATE_DICT_WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{name} holds no tensors")
    return tensors
