"""Checkpoint reading, layout detection and conversion to our (= the official) state-dict layout.

Layouts (see docs in shared notes §3):

* ``official`` (microsoft/FocalNet): ``patch_embed``, ``layers.i.blocks.j.{norm1, modulation.{f, h, proj,
  focal_layers.k.0, ln}, norm2, mlp.fc1, mlp.fc2, gamma_1, gamma_2}``, ``layers.i.downsample`` at the END
  of stage i, ``norm``, ``head``. Usually wrapped as ``{"model": state_dict}``. Identical to ours.
* ``timm``: ``stem``, ``layers.{i+1}.downsample`` at the START of the next stage, ``ls1.gamma`` /
  ``ls2.gamma``, ``norm1_post`` / ``norm2_post`` (post-norm models), ``modulation.norm``, ``head.fc``,
  and f / proj / fc1 / fc2 stored as 1x1 convolutions ([out, in, 1, 1]).
* ``hf`` (Hugging Face transformers): optional ``focalnet.`` prefix (classification / backbone / MIM
  models), ``embeddings.patch_embeddings.projection``, ``embeddings.norm``,
  ``encoder.stages.i.layers.j.modulation.{projection_in, projection_context, projection_out, layernorm}``,
  ``encoder.stages.i.downsample.{projection, norm}``, ``layernorm``, ``classifier``.

Every conversion is a pure function ``state_dict -> state_dict`` (new dict, tensors shared / reshaped).
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "LoadResult", "CheckpointError", "CheckpointMismatchError", "read_checkpoint",
           "verify_checkpoint", "unwrap_state_dict", "detect_layout", "convert_state_dict", "timm_to_official",
           "hf_to_official", "load_checkpoint"]

LAYOUTS = ("official", "timm", "hf")
StateDict = Dict[str, Tensor]
PathLike = Union[str, bytes, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: a file that failed verification (a record's CRC-32,
    the SHA-256 digest, a safetensors header), cannot be read as a checkpoint, or is no regular file.

    A subclass of ValueError (the value handed in, the file's contents, is wrong), so code that caught
    the ValueError raised for unreadable checkpoints before still catches it. The message names the file
    and what failed: which record or tensor, what was expected and what was found.
    """


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's keys, shapes or dtypes do not match the model (strict loading).

    A RuntimeError, like torch's own ``load_state_dict`` errors, and a CheckpointError (so a ValueError too).
    """


@dataclass
class LoadResult:
    """What `load_checkpoint` did (like torch's `_IncompatibleKeys`, plus shapes and skipped keys)."""
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    #: (key, checkpoint shape, model shape) for every key present on both sides with different shapes
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    #: checkpoint keys deliberately not loaded (classifier parts the model does not have, reset_head)
    skipped_keys: List[str] = field(default_factory=list)
    layout: str = ""
    #: (key, checkpoint dtype, model dtype) for values of another kind: integer or bool for a floating
    #: point tensor and the like (another floating precision is converted, not listed here)
    mismatched_dtypes: List[Tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
_EXPECTED = ("a PyTorch checkpoint (torch.save) or a safetensors file holding a FocalNet state dict, "
             "optionally wrapped as {'model': state_dict} or {'state_dict': state_dict}")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pth.tar")
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _checkpoint_path(path: PathLike) -> str:
    """`path` as a str (bytes paths decoded like open() does) after checking it names a regular file."""
    path = os.fsdecode(os.fspath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(errno.ENOENT, f"checkpoint file not found: {path!r} is a symbolic link to "
                                                  f"{os.readlink(path)!r}, which does not exist", path) from None
        raise FileNotFoundError(errno.ENOENT, f"checkpoint file not found: {path!r}", path) from None
    if stat.S_ISDIR(mode):
        try:
            inside = sorted(n for n in os.listdir(path) if n.endswith(_CHECKPOINT_SUFFIXES))
        except OSError:
            inside = []
        hint = f" (it holds {', '.join(inside[:4])}: pass the file itself)" if inside else ""
        raise IsADirectoryError(errno.EISDIR, f"{path!r} is a directory, not a checkpoint file{hint}", path)
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
        raise CheckpointError(f"{path!r} is {what}; a checkpoint must be a regular file (it is read with seeks "
                              f"and its size must be known)")
    return path


def _fail(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path!r} failed verification: {what}")


# --- SHA-256: the sha256= argument and torch.hub's name-<hash prefix>.ext convention ---------------
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[^-]+$")


def _expected_sha256(path: str, sha256: Optional[str], check_name_hash: bool) -> Optional[Tuple[str, str]]:
    """(expected hex digest or prefix, where it comes from) or None."""
    if sha256 is not None:
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise (TypeError if not isinstance(sha256, str) else ValueError)(
                f"sha256 must be the file's SHA-256 digest as 64 hexadecimal digits, got {sha256!r}")
        return sha256.lower(), "sha256"
    if check_name_hash:
        m = _NAME_HASH.search(os.path.basename(path))
        if m:
            return m.group(1), "name"
    return None


def _check_sha256(path: str, view, expected: Tuple[str, str]) -> None:
    want, source = expected
    got = hashlib.sha256(view).hexdigest()
    if source == "sha256" and got != want:
        raise _fail(path, f"expected SHA-256 {want}, got {got}")
    if source == "name" and not got.startswith(want):
        raise _fail(path, f"its name carries the SHA-256 prefix {want!r} (torch.hub's name-<hash>.ext "
                          f"convention), but the file's SHA-256 is {got}; if that suffix is not a hash, pass "
                          f"check_name_hash=False")


# --- torch zip checkpoints: CRC-32 of every record -----------------------------------------------
_CRC32: List[Callable] = []


def _crc32_function() -> Callable:
    """The CRC-32 (zip's polynomial) to use: libdeflate's when the system has that library (folding
    with PCLMULQDQ / VPCLMULQDQ: about 2.3x zlib's CPU time on 2 Xeon cores), else zlib.crc32.
    FOCALNET_CRC32 = auto (default, also when empty) | libdeflate (raises where it cannot be loaded) |
    zlib, case and surrounding whitespace ignored, anything else a ValueError. Chosen once, libdeflate
    checked against zlib on a probe before use."""
    if not _CRC32:
        from focalnet_kernels.dispatch import forced_backend
        choice = forced_backend("FOCALNET_CRC32", ("auto", "libdeflate", "zlib"))
        fn = None if choice == "zlib" else _libdeflate_crc32()
        if choice == "libdeflate" and fn is None:
            raise RuntimeError("FOCALNET_CRC32=libdeflate, but libdeflate's CRC-32 cannot be loaded here "
                               "(no libdeflate shared library, or numpy missing); unset it or use zlib")
        _CRC32.append(fn)
    return _CRC32[0] or zlib.crc32


def _libdeflate_crc32() -> Optional[Callable]:
    import ctypes
    try:
        import numpy as np
    except ImportError:
        return None
    for soname in ("libdeflate.so.0", "libdeflate.so", "libdeflate.dylib", "libdeflate.0.dylib", "deflate.dll"):
        try:
            fn = ctypes.CDLL(soname).libdeflate_crc32
            break
        except (OSError, AttributeError):
            continue
    else:
        return None
    fn.restype, fn.argtypes = ctypes.c_uint32, (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)

    def crc32(data) -> int:  # the foreign call releases the GIL, as zlib.crc32 does
        a = np.frombuffer(data, dtype=np.uint8)
        return int(fn(0, a.ctypes.data, a.size)) if a.size else 0

    probe = os.urandom(4099)
    return crc32 if crc32(probe) == zlib.crc32(probe) else None


def _zip_records(path: str, view) -> List[Tuple[zipfile.ZipInfo, int]]:
    """Every record of the archive with the offset of its data, checked against its local header."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except Exception as e:  # BadZipFile, struct.error ... on a damaged directory
        raise _fail(path, f"its zip directory cannot be read ({type(e).__name__}: {e})") from e
    size = len(view)
    records = []
    for info in infos:
        off = info.header_offset
        if off < 0 or off + 30 > size or bytes(view[off:off + 4]) != b"PK\x03\x04":
            raise _fail(path, f"record {info.filename!r}: no local header at byte {off}")
        flags, = struct.unpack_from("<H", view, off + 6)
        n_name, n_extra = struct.unpack_from("<HH", view, off + 26)
        name = bytes(view[off + 30:off + 30 + n_name]).decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if name != info.orig_filename:
            raise _fail(path, f"record {info.filename!r}: its local header names it {name!r}")
        start = off + 30 + n_name + n_extra
        if start + info.compress_size > size:
            raise _fail(path, f"record {info.filename!r} (bytes {start}..{start + info.compress_size}) runs past the "
                              f"end of the file ({size} bytes): truncated?")
        records.append((info, start))
    return records


def _check_zip_crcs(path: str, view) -> None:
    records = _zip_records(path, view)
    if all(info.CRC == 0 for info, _ in records):
        return  # written with torch.serialization.set_crc32_options(False): no CRC to compare with
    crc32 = _crc32_function()
    for info, start in records:
        end = start + info.compress_size
        if info.compress_type == zipfile.ZIP_STORED:  # what torch.save writes
            got = crc32(view[start:end])
        else:
            got = _crc_of_compressed(path, info)
        if got != info.CRC:
            raise _fail(path, f"record {info.filename!r} (bytes {start}..{end}): expected CRC-32 {info.CRC:#010x}, "
                              f"got {got:#010x}; the file is damaged or was changed after it was written")


def _crc_of_compressed(path: str, info: zipfile.ZipInfo) -> int:
    crc = 0
    try:
        with zipfile.ZipFile(path) as zf, zf.open(info) as f:
            if hasattr(f, "_expected_crc"):
                f._expected_crc = None  # we compare ourselves, to report expected vs got
            for chunk in iter(lambda: f.read(1 << 22), b""):
                crc = zlib.crc32(chunk, crc)
    except Exception as e:
        raise _fail(path, f"record {info.filename!r} cannot be decompressed ({type(e).__name__}: {e})") from e
    return crc


# --- safetensors header -----------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64"}
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors package's own limit


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the name {k!r} appears twice")
        out[k] = v
    return out


def _safetensors_header(path: str) -> Tuple[int, Dict[str, Tuple[torch.dtype, List[int], int, int]]]:
    """Check a safetensors file's header against its size; (data start, name -> (dtype, shape, begin, end))."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"too short for a safetensors file ({size} bytes; its header length alone takes 8)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise _fail(path, f"safetensors header length {n} does not fit the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"the safetensors header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise _fail(path, f"the safetensors header is a JSON {type(header).__name__}, not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "the safetensors header's __metadata__ must map names to strings")
    data_size = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        where = f"safetensors tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"{where}: expected an entry with dtype, shape and data_offsets, got {str(entry)[:120]}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        dtype = getattr(torch, _SAFETENSORS_DTYPES.get(code, ""), None) if isinstance(code, str) else None
        if not isinstance(dtype, torch.dtype):
            raise _fail(path, f"{where}: unsupported dtype {code!r} (known: {', '.join(_SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        need = dtype.itemsize
        for d in shape:
            need *= d
        if end - begin != need:
            raise _fail(path, f"{where}: dtype {code} and shape {shape} take {need} bytes, its data_offsets "
                              f"[{begin}, {end}] span {end - begin}")
        if end > data_size:
            raise _fail(path, f"{where}: data_offsets [{begin}, {end}] run past the end of the data ({data_size} "
                              f"bytes after the header): truncated?")
        tensors[name] = (dtype, shape, begin, end)
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise _fail(path, f"safetensors tensors {prev!r} and {name!r} overlap (bytes {begin}..{pos})")
        if begin > pos:
            raise _fail(path, f"bytes {pos}..{begin} of the safetensors data belong to no tensor (before {name!r})")
        pos, prev = end, name
    if pos != data_size:
        raise _fail(path, f"the last {data_size - pos} bytes of the safetensors data belong to no tensor")
    return 8 + n, tensors


def _read_safetensors(path: str, data_start: int, tensors) -> StateDict:
    """Our own reader for a verified header, used when the safetensors package is not installed."""
    if sys.byteorder != "little":
        raise CheckpointError(f"{path!r}: reading safetensors (little-endian) without the safetensors package "
                              f"needs a little-endian machine; pip install safetensors")
    out = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
            t = torch.empty(shape, dtype=dtype)
            if end > begin:
                f.seek(data_start + begin)
                if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                    raise _fail(path, f"safetensors tensor {name!r} could not be read in full")
            out[name] = t
    return out


def _load_safetensors(path: str, header) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        if header is None:
            header = _safetensors_header(path)
        return _read_safetensors(path, *header)
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path!r} could not be read as a safetensors file ({type(e).__name__}: "
                              f"{str(e).strip()[:300]})") from e


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes, truncated zip / pickle, unsupported pickled objects ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = ""
        if "weights_only" in str(e):
            hint = (" (it pickles objects other than tensors; if you trust the file, torch.load it with "
                    "weights_only=False yourself and pass the state dict)")
        raise CheckpointError(f"{path!r} could not be read as a checkpoint ({type(e).__name__}: {msg}){hint}; "
                              f"expected {_EXPECTED}") from e


# --- putting it together ----------------------------------------------------------------------------
def _file_format(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if path.endswith(".safetensors") or head[8:9] == b"{":
        return "safetensors"
    return "torch-legacy"  # the pre-1.6 pickle format, or not a checkpoint at all


def _with_file_view(path: str, fn: Callable[[str, memoryview], None]) -> None:
    """fn(path, read-only memoryview of the whole file), mapped rather than read."""
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            fn(path, view)


def _prepare(path: PathLike, sha256: Optional[str], verify: bool, check_name_hash: bool):
    """Path checks, the format, the safetensors header and the checks left for the file's bytes."""
    path = _checkpoint_path(path)
    expected = _expected_sha256(path, sha256, verify and check_name_hash)
    if os.path.getsize(path) == 0:
        raise _fail(path, "the file is empty (0 bytes)")
    fmt = _file_format(path)
    header = _safetensors_header(path) if fmt == "safetensors" and verify else None
    crc = verify and fmt == "torch-zip"

    def check_bytes(p: str, view) -> None:
        if crc:
            _check_zip_crcs(p, view)
        if expected is not None:
            _check_sha256(p, view, expected)

    return path, fmt, header, (check_bytes if crc or expected is not None else None)


def verify_checkpoint(path: PathLike, *, sha256: Optional[str] = None, check_name_hash: bool = True) -> str:
    """Run every check `read_checkpoint` makes, without loading; returns the file's format
    ('torch-zip', 'torch-legacy' or 'safetensors'). Raises CheckpointError on the first failure."""
    path, fmt, _, check_bytes = _prepare(path, sha256, True, check_name_hash)
    if check_bytes is not None:
        _with_file_view(path, check_bytes)
    return fmt


def read_checkpoint(path: PathLike, *, sha256: Optional[str] = None, verify: bool = True,
                    check_name_hash: bool = True) -> StateDict:
    """Read and verify a checkpoint file; return its flat name -> tensor state dict (unwrapped).

    Formats: torch.save files, read with ``torch.load(weights_only=True)`` (zip format, and the legacy
    pre-1.6 pickle format), and safetensors files (``.safetensors``, or recognised by their header), read
    with the safetensors package when it is installed and by our own reader otherwise.

    Checks, all made before the state dict is returned (so `load_checkpoint` never half-loads a model):

    * ``verify=True`` (default), torch zip files: the CRC-32 of every record against the archive's
      directory, and every local header against it. torch's own reader skips these, so flipped bytes in a
      tensor load silently without them. Files written with ``torch.serialization.set_crc32_options(False)``
      (every CRC 0) have nothing to compare with and are not checked. Legacy (non-zip) torch files carry no
      checksum at all: they cannot be CRC-checked and load as before; pass ``sha256=`` to check them.
      The CRC pass runs in a helper thread while torch.load reads the file (zlib releases the GIL).
    * ``verify=True``, safetensors files: the header, before any tensor is read: the 8-byte little-endian
      length fits the file, the header is a JSON object, every tensor's dtype is known and its shape and
      ``data_offsets`` agree in size, and the tensors' byte ranges neither overlap nor leave a gap, and
      cover the data to the end of the file. safetensors stores no checksum of the data itself.
    * ``sha256="<64 hex digits>"``: the SHA-256 of the whole file (any format; also with verify=False).
    * ``verify=True`` and ``check_name_hash=True``: torch.hub's naming convention. A file name whose part
      after its last '-' is 8 to 64 lowercase hex digits and an extension, as in ``resnet18-f37072fd.pth``,
      promises that the file's SHA-256 starts with those digits, and it is checked. A name like
      ``ckpt-20240315.pth`` matches the pattern too (all digits are hex): pass ``check_name_hash=False``.

    Any failed check raises CheckpointError (a ValueError) naming the file and the record, tensor or
    digest, expected against found. A directory raises IsADirectoryError, a missing file FileNotFoundError,
    a FIFO, device or socket CheckpointError. `path` may be str, bytes or os.PathLike.
    """
    path, fmt, header, check_bytes = _prepare(path, sha256, verify, check_name_hash)
    if fmt == "safetensors":
        load = lambda: _load_safetensors(path, header)  # noqa: E731
    else:
        load = lambda: _torch_load(path)  # noqa: E731
    if check_bytes is None:
        obj = load()
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="focalnet-verify") as pool:
            checked = pool.submit(_with_file_view, path, check_bytes)
            try:
                obj = load()
            except Exception:
                checked.result()  # a failed check explains a failed load better: it wins
                raise
            checked.result()
    return unwrap_state_dict(obj, source=repr(path))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def unwrap_state_dict(obj, source: str = "the checkpoint") -> StateDict:
    """Return the flat name -> tensor dict inside `obj` ({'model': ...}, {'state_dict': ...} or flat).

    A common ``module.`` prefix (DataParallel / DDP) is stripped.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and not _is_state_dict(obj):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict; expected {_EXPECTED}")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{source} holds no name -> tensor entries; expected {_EXPECTED}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------------
# layout detection
# ------------------------------------------------------------------------------------------------
def detect_layout(state_dict) -> str:
    """'official', 'timm' or 'hf' (also accepts the wrapped forms); ValueError if not a FocalNet."""
    sd = unwrap_state_dict(state_dict) if not _is_state_dict(state_dict) else state_dict
    keys = list(sd)
    if any(".modulation.projection_in." in k for k in keys) or any(
            k.startswith(("focalnet.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    has_mod = any(re.search(r"(^|\.)layers\.\d+\.blocks\.\d+\.modulation\.f\.weight$", k) for k in keys)
    if has_mod:
        timm_marks = ("stem.proj.", "head.fc.", ".ls1.gamma", ".ls2.gamma", "_post.", ".modulation.norm.")
        if any(k.startswith("stem.") for k in keys) or any(m in k for k in keys for m in timm_marks):
            return "timm"
        if any(k.endswith("modulation.f.weight") and sd[k].ndim == 4 for k in keys):
            return "timm"
        return "official"
    sample = ", ".join(keys[:4])
    kind = ""
    if any(re.search(r"\.attn\.|relative_position|\.qkv\.", k) for k in keys):
        kind = " (its keys look like an attention model, e.g. Swin / ViT)"
    raise ValueError(f"the state dict is not a FocalNet checkpoint{kind}: no focal-modulation keys "
                     f"(official '...blocks.j.modulation.f.weight', timm, or Hugging Face "
                     f"'...modulation.projection_in.weight') among {len(keys)} keys, e.g. {sample}")


# ------------------------------------------------------------------------------------------------
# conversions (pure)
# ------------------------------------------------------------------------------------------------
_LINEAR_AS_CONV = re.compile(r"\.(modulation\.f|modulation\.proj|mlp\.fc1|mlp\.fc2)\.weight$")


def timm_to_official(state_dict: StateDict) -> StateDict:
    out: StateDict = {}
    for k, v in state_dict.items():
        nk = k
        if nk.startswith("stem."):
            nk = "patch_embed." + nk[len("stem."):]
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", nk)
        if m:  # timm: downsample at the start of stage i+1  ->  official: end of stage i
            nk = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        nk = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", nk)
        nk = re.sub(r"\.norm([12])_post\.", r".norm\1.", nk)
        nk = nk.replace(".modulation.norm.", ".modulation.ln.")
        if nk.startswith("head.fc."):
            nk = "head." + nk[len("head.fc."):]
        if v.ndim == 4 and v.shape[2:] == (1, 1) and _LINEAR_AS_CONV.search(nk):
            v = v.reshape(v.shape[0], v.shape[1])
        out[nk] = v
    return out


_HF_RULES = [
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^embeddings\.norm\."), "patch_embed.norm."),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\."), r"layers.\1.blocks.\2."),
    (re.compile(r"^encoder\.stages\.(\d+)\.downsample\.projection\."), r"layers.\1.downsample.proj."),
    (re.compile(r"^encoder\.stages\.(\d+)\.downsample\.norm\."), r"layers.\1.downsample.norm."),
    (re.compile(r"\.modulation\.projection_in\."), ".modulation.f."),
    (re.compile(r"\.modulation\.projection_context\."), ".modulation.h."),
    (re.compile(r"\.modulation\.projection_out\."), ".modulation.proj."),
    (re.compile(r"\.modulation\.layernorm\."), ".modulation.ln."),
    (re.compile(r"^layernorm\."), "norm."),
    (re.compile(r"^classifier\."), "head."),
]


def hf_to_official(state_dict: StateDict) -> StateDict:
    out: StateDict = {}
    for k, v in state_dict.items():
        nk = k[len("focalnet."):] if k.startswith("focalnet.") else k
        for pattern, repl in _HF_RULES:
            nk = pattern.sub(repl, nk)
        out[nk] = v
    return out


_CONVERTERS = {"official": dict, "timm": timm_to_official, "hf": hf_to_official}


def convert_state_dict(state_dict, src_layout: Optional[str] = None) -> StateDict:
    """Convert an official / timm / Hugging Face state dict (wrapped or not) to our layout."""
    sd = unwrap_state_dict(state_dict)
    layout = src_layout or detect_layout(sd)
    if layout not in _CONVERTERS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    return _CONVERTERS[layout](sd)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _fmt_shape(s) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a value of dtype `a` may be copied into a tensor of dtype `b`: floating into floating (any
    precision), complex into complex, bool into bool, integer into integer."""
    return (a.is_floating_point, a.is_complex, a == torch.bool) == (b.is_floating_point, b.is_complex, b == torch.bool)


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True, reset_head: bool = False,
                    src_layout: Optional[str] = None, *, sha256: Optional[str] = None,
                    verify: bool = True, check_name_hash: bool = True) -> LoadResult:
    """Load an official / timm / Hugging Face FocalNet checkpoint (path or dict) into `model`.

    * A path (str, bytes or os.PathLike) is read and verified by :func:`read_checkpoint` (``sha256``,
      ``verify`` and ``check_name_hash`` are passed on): CRC-32 of every record of a torch zip file, the safetensors header, an
      expected SHA-256. Every check and the layout conversion happen before the model is touched: a
      failure leaves the model as it was.
    * Classifier keys the model has no place for are skipped, not reported as unexpected: ``head.*``
      when the model has no head (num_classes=0 or features_only) and ``norm.*`` with features_only.
      With features_only the per-output ``norm{i}`` layers, absent from classification checkpoints,
      keep their initialisation (listed in `missing_keys`, not an error).
    * reset_head=True: ``head.*`` tensors whose shape differs from the model's are skipped and the
      model keeps its own head.
    * Values of another kind than the model's tensor (integer or bool for a floating-point parameter,
      ...) are refused; another floating precision (an fp16 / bf16 checkpoint for an fp32 model) is
      converted on load.
    * strict=True: any missing, unexpected, mis-shaped or wrongly typed key raises ONE
      CheckpointMismatchError (a RuntimeError) listing all of them; strict=False loads what matches and
      reports the rest.
    """
    if isinstance(path_or_state_dict, (str, bytes, os.PathLike)):
        source = repr(os.fsdecode(os.fspath(path_or_state_dict)))
        raw = read_checkpoint(path_or_state_dict, sha256=sha256, verify=verify, check_name_hash=check_name_hash)
    else:
        if sha256 is not None:
            raise ValueError("sha256= applies to a checkpoint file, not to a state dict")
        source = "the given state dict"
        raw = unwrap_state_dict(path_or_state_dict, source=source)
    layout = src_layout or detect_layout(raw)
    sd = convert_state_dict(raw, layout)

    own = model.state_dict()
    result = LoadResult(layout=layout)
    features_only = bool(getattr(model, "features_only", False))
    no_head = not any(k.startswith("head.") for k in own)
    optional_missing = set()
    if features_only:
        optional_missing = {k for k in own if re.match(r"norm\d+\.", k)}

    to_load: StateDict = {}
    for k, v in sd.items():
        if (no_head and k.startswith("head.")) or (features_only and k.startswith("norm.") and k not in own):
            result.skipped_keys.append(k)
            continue
        if k not in own:
            result.unexpected_keys.append(k)
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            if reset_head and k.startswith("head."):
                result.skipped_keys.append(k)
                continue
            result.mismatched_keys.append((k, tuple(v.shape), tuple(own[k].shape)))
            continue
        if not _same_kind(v.dtype, own[k].dtype):
            result.mismatched_dtypes.append((k, v.dtype, own[k].dtype))
            continue
        to_load[k] = v
    mismatched = {k for k, _, _ in result.mismatched_keys}
    result.missing_keys = [k for k in own if k not in sd and k not in mismatched]
    hard_missing = [k for k in result.missing_keys if k not in optional_missing]

    if strict and (hard_missing or result.unexpected_keys or result.mismatched_keys or result.mismatched_dtypes):
        lines = [f"error loading {source} ({layout} layout) into {type(model).__name__}:"]
        if hard_missing:
            lines.append(f"  missing keys ({len(hard_missing)}): {', '.join(hard_missing)}")
        if result.unexpected_keys:
            lines.append(f"  unexpected keys ({len(result.unexpected_keys)}): {', '.join(result.unexpected_keys)}")
        if result.mismatched_keys:
            lines.append(f"  mis-shaped keys ({len(result.mismatched_keys)}): " + ", ".join(
                f"{k} (checkpoint {_fmt_shape(a)}, model {_fmt_shape(b)})" for k, a, b in result.mismatched_keys))
            head = [(k, a, b) for k, a, b in result.mismatched_keys if k.startswith("head.")]
            if head:
                n_ckpt, n_model = head[0][1][0], head[0][2][0]
                lines.append(f"  the checkpoint's head has {n_ckpt} classes and the model's {n_model}: build the "
                             f"model with num_classes={n_ckpt}, or pass reset_head=True (or strict=False) to keep "
                             f"the model's own freshly initialised head")
        if result.mismatched_dtypes:
            lines.append(f"  keys of another kind of dtype ({len(result.mismatched_dtypes)}): " + ", ".join(
                f"{k} (checkpoint {a}, model {b})" for k, a, b in result.mismatched_dtypes))
        raise CheckpointMismatchError("\n".join(lines))

    model.load_state_dict(to_load, strict=False)
    return result
