"""What `read_checkpoint` / `load_checkpoint` verify before anything reaches the model (issue 12):
CRC-32 of every record of a torch zip checkpoint, a `sha256=` digest, torch.hub's `name-<hash>.ext`
convention, the safetensors header; what they say about paths that are no regular file; dtypes."""
import hashlib
import json
import os
import socket
import struct
import sys
import zipfile

import pytest
import torch

import focalnet
from focalnet import CheckpointError, CheckpointMismatchError, load_checkpoint, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed=0, **kw):
    cfg = dict(num_classes=7, embed_dim=16, depths=(1, 1, 1, 1), focal_levels=2, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = focalnet.FocalNet(**cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def saved(tmp_path, name="ckpt.pth", obj=None, **save_kw):
    path = tmp_path / name
    torch.save(model(0).state_dict() if obj is None else obj, path, **save_kw)
    return path


def flip(path, at, n=64):
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def record_at(path, offset):
    """The zip record whose data holds byte `offset`, and its data range."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            n, e = struct.unpack("<HH", f.read(4))
            start = info.header_offset + 30 + n + e
            if start <= offset < start + info.compress_size:
                return info.filename, start, start + info.compress_size
    raise AssertionError(f"no record holds byte {offset}")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# torch zip checkpoints: CRC-32 of every record
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["zlib", "libdeflate"])
def crc_impl(request, monkeypatch):
    """Run a test with each CRC-32 implementation the checks may use (libdeflate where the system has it)."""
    from focalnet import checkpoint
    impl = None if request.param == "zlib" else checkpoint._libdeflate_crc32()
    if request.param == "libdeflate" and impl is None:
        pytest.skip("libdeflate is not installed here")
    monkeypatch.setattr(checkpoint, "_CRC32", [impl])
    return request.param


def test_crc32_implementations_agree(crc_impl):
    import zlib
    from focalnet import checkpoint
    crc32 = checkpoint._crc32_function()
    assert (crc32 is zlib.crc32) == (crc_impl == "zlib")
    data = os.urandom(1 << 16)
    for a, b in [(0, 0), (0, 1), (3, 4099), (0, len(data))]:
        assert crc32(memoryview(data)[a:b]) == zlib.crc32(data[a:b])


def test_crc32_choice_follows_the_environment(monkeypatch):
    import zlib
    from focalnet import checkpoint
    for value in ("zlib", " ZLIB "):
        monkeypatch.setattr(checkpoint, "_CRC32", [])
        monkeypatch.setenv("FOCALNET_CRC32", value)
        assert checkpoint._crc32_function() is zlib.crc32
    monkeypatch.setattr(checkpoint, "_CRC32", [])
    monkeypatch.setenv("FOCALNET_CRC32", "crc9")
    with pytest.raises(ValueError, match="FOCALNET_CRC32"):
        checkpoint._crc32_function()


def test_flipped_bytes_in_a_tensor_record_are_caught(tmp_path, crc_impl):
    path = saved(tmp_path)
    size = path.stat().st_size
    name, start, end = record_at(path, size // 2)
    assert end - start > 256  # the middle lies in a tensor's data, where torch.load does not look
    flip(path, size // 2)
    torch.load(path, weights_only=True)  # ... and loads silently (the reason for this check)

    dst = model(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(dst, path)
    msg = str(ei.value)
    assert repr(str(path)) in msg and f"record '{name}'" in msg
    with zipfile.ZipFile(path) as zf:
        want = zf.getinfo(name).CRC
    assert f"expected CRC-32 {want:#010x}, got 0x" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing loaded
    assert isinstance(ei.value, ValueError)
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_checkpoint(path)
    # verify=False is today's behaviour: it loads
    assert read_checkpoint(path, verify=False).keys() == model(0).state_dict().keys()


def test_flipped_bytes_in_the_pickle_and_in_a_local_header(tmp_path):
    path = saved(tmp_path)
    with zipfile.ZipFile(path) as zf:
        pkl = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        last = zf.infolist()[-1]
    name, start, _ = record_at(path, pkl.header_offset + 100)
    flip(path, start + 20, 8)
    with pytest.raises(CheckpointError, match=f"record '{name}'"):
        read_checkpoint(path)

    path = saved(tmp_path, "other.pth")
    flip(path, last.header_offset + 31, 2)  # the record's name in its local header
    with pytest.raises(CheckpointError, match=r"local header"):
        read_checkpoint(path)


def test_every_record_is_checked(tmp_path, crc_impl):
    """A flip anywhere in any record's data is caught, not only in large records."""
    path = saved(tmp_path)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.file_size > 0]
    for info in infos:
        n, e = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
        start = info.header_offset + 30 + n + e
        bad = tmp_path / "bad.pth"
        bad.write_bytes(data)
        flip(bad, start + info.compress_size // 2, 1)
        with pytest.raises(CheckpointError, match=f"record '{info.filename}'"):
            read_checkpoint(bad)


def test_deflated_records(tmp_path):
    """torch.load reads a re-zipped checkpoint with compressed records; their CRC is checked too."""
    src = saved(tmp_path)
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info))
    dst = model(1)
    load_checkpoint(dst, path)
    assert same_weights(dst, model(0))
    with zipfile.ZipFile(path) as zf:
        big = max(zf.infolist(), key=lambda i: i.compress_size)
    name, start, end = record_at(path, big.header_offset + 100)
    flip(path, (start + end) // 2, 4)
    with pytest.raises(CheckpointError, match=f"record '{name}'"):
        read_checkpoint(path)


def test_truncated_zip_is_a_checkpoint_error(tmp_path):
    path = saved(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 30])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_checkpoint(cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth.*empty"):
        read_checkpoint(empty)


def test_files_saved_without_crc_still_load(tmp_path):
    """torch.serialization.set_crc32_options(False) writes 0 for every CRC: nothing to check, not an error."""
    from torch import serialization
    old = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        path = saved(tmp_path)
    finally:
        serialization.set_crc32_options(old)
    with zipfile.ZipFile(path) as zf:
        assert all(i.CRC == 0 for i in zf.infolist())
    dst = model(1)
    load_checkpoint(dst, path)
    assert same_weights(dst, model(0))


def test_legacy_format_loads_and_honours_sha256(tmp_path):
    """Non-zip torch files carry no CRC: they load as before (weights_only=True), a sha256 still applies."""
    path = saved(tmp_path, "legacy.pth", _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:4] != b"PK\x03\x04"
    dst = model(1)
    load_checkpoint(dst, path)
    assert same_weights(dst, model(0))
    read_checkpoint(path, sha256=sha(path))
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(path, sha256="0" * 64)
    assert "legacy" in focalnet.read_checkpoint.__doc__


# ---------------------------------------------------------------------------------------------
# sha256 and torch.hub's name-<hash>.ext convention
# ---------------------------------------------------------------------------------------------
def test_sha256_argument(tmp_path):
    path = saved(tmp_path)
    digest = sha(path)
    dst = model(1)
    load_checkpoint(dst, path, sha256=digest.upper())  # case does not matter
    assert same_weights(dst, model(0))
    wrong = ("f" if digest[0] != "f" else "e") + digest[1:]
    dst = model(1)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(dst, path, sha256=wrong)
    msg = str(ei.value)
    assert repr(str(path)) in msg and f"expected SHA-256 {wrong}, got {digest}" in msg
    assert same_weights(dst, model(1))
    for bad in ("abc", "g" * 64, 123):
        with pytest.raises((ValueError, TypeError), match="sha256"):
            read_checkpoint(path, sha256=bad)


def test_hash_prefix_in_the_file_name(tmp_path):
    src = saved(tmp_path)
    digest = sha(src)
    good = tmp_path / f"focalnet_tiny-{digest[:10]}.pth"
    good.write_bytes(src.read_bytes())
    assert read_checkpoint(good).keys() == model(0).state_dict().keys()

    wrong = ("0" if digest[0] != "0" else "1") + digest[1:8]
    bad = tmp_path / f"focalnet_tiny-{wrong}.pth"
    bad.write_bytes(src.read_bytes())
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(bad)
    msg = str(ei.value)
    assert wrong in msg and digest in msg and "check_name_hash=False" in msg
    read_checkpoint(bad, check_name_hash=False)  # the opt-out, e.g. for a date that looks like hex
    dst = model(1)
    load_checkpoint(dst, bad, check_name_hash=False)
    assert same_weights(dst, model(0))

    # names that do not follow the pattern are not checked
    for name in ("model-v2.pth", "model-abc123.pth", "model-ABCDEF12.pth", "modelabcdef12.pth",
                 f"model-{wrong}"):
        other = tmp_path / name
        other.write_bytes(src.read_bytes())
        read_checkpoint(other)


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
def write_safetensors(path, tensors, header_edit=None, tail=b""):
    """A safetensors file written by hand (the format: 8-byte LE header length, JSON header, data)."""
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, pos = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    header["__metadata__"] = {"format": "pt"}
    if header_edit is not None:
        header_edit(header)
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs) + tail)
    return path


def test_safetensors_loads_with_and_without_the_package(tmp_path, monkeypatch):
    src = model(0)
    sd = src.state_dict()
    sd["norm.weight"] = sd["norm.weight"].to(torch.bfloat16)  # another precision is fine
    path = write_safetensors(tmp_path / "m.safetensors", sd)
    got = read_checkpoint(path)
    assert all(torch.equal(got[k], v) for k, v in sd.items()) and got.keys() == sd.keys()
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:  # a file written by the safetensors package itself
        lib = tmp_path / "lib.safetensors"
        save_file(sd, str(lib))
        assert all(torch.equal(read_checkpoint(lib)[k], v) for k, v in sd.items())
    monkeypatch.setitem(sys.modules, "safetensors", None)  # not installed: our own reader
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    got = read_checkpoint(path)
    assert all(torch.equal(got[k], v) for k, v in sd.items()) and got.keys() == sd.keys()
    dst = model(1)
    load_checkpoint(dst, path)
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        ref = model(0)
        ref.norm.weight.copy_(ref.norm.weight.to(torch.bfloat16))
        assert torch.equal(dst(x), ref(x))


def _set(key, field, value):
    def edit(h):
        h[key][field] = value
    return edit


@pytest.mark.parametrize("case, edit, tail, pattern", [
    ("shape", _set("a", "shape", [3, 5]), b"", r"tensor 'a'.*\[3, 5\].*60 bytes.*48"),
    ("dtype", _set("a", "dtype", "Q7"), b"", r"tensor 'a'.*dtype 'Q7'"),
    ("overlap", _set("b", "data_offsets", [40, 56]), b"", r"'a' and 'b' overlap"),
    ("gap", _set("b", "data_offsets", [52, 68]), b"\0" * 4, r"bytes 48\.\.52.*no tensor"),
    ("past_end", lambda h: h["b"].update(shape=[6], data_offsets=[48, 72]), b"", r"tensor 'b'.*past the end"),
    ("tail", None, b"\0" * 8, r"last 8 bytes.*no tensor"),
    ("negative", _set("a", "data_offsets", [-4, 44]), b"", r"tensor 'a'.*data_offsets"),
    ("entry", _set("a", "extra", 1), b"", r"tensor 'a'.*dtype, shape and data_offsets"),
    ("metadata", lambda h: h.__setitem__("__metadata__", {"x": 1}), b"", r"__metadata__"),
    ("bool_shape", _set("a", "shape", [True, 12]), b"", r"tensor 'a'.*shape"),
])
def test_safetensors_header_checks(tmp_path, case, edit, tail, pattern):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(4)}
    path = write_safetensors(tmp_path / f"{case}.safetensors", tensors, edit, tail)
    with pytest.raises(CheckpointError, match=pattern) as ei:
        read_checkpoint(path)
    assert repr(str(path)) in str(ei.value)


def test_safetensors_broken_header_bytes(tmp_path):
    good = write_safetensors(tmp_path / "g.safetensors", {"a": torch.randn(4)})
    data = good.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    cases = {
        "huge_len": (struct.pack("<Q", 1 << 40) + data[8:], r"header length"),
        "short": (data[:5], r"too short"),
        "not_json": (data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:], r"JSON"),
        "not_object": (data[:8] + b"[" + b" " * (n - 2) + b"]" + data[8 + n:], r"JSON object"),
        "dup": (None, r"twice"),
    }
    for case, (content, pattern) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        if content is None:
            text = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
                   b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
            content = struct.pack("<Q", len(text)) + text + b"\0" * 8
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=pattern):
            read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# paths that are not regular files, bytes paths
# ---------------------------------------------------------------------------------------------
def test_directory(tmp_path):
    d = tmp_path / "repo"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory, not a checkpoint file"):
        load_checkpoint(model(), d)
    saved(d, "model.safetensors")  # a folder with a checkpoint in it: say which
    with pytest.raises(IsADirectoryError, match="model.safetensors"):
        read_checkpoint(d)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_and_devices(tmp_path):
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO.*regular file"):
        load_checkpoint(model(), fifo)
    if os.path.exists("/dev/zero"):
        with pytest.raises(CheckpointError, match="character device.*regular file"):
            read_checkpoint("/dev/zero")
    sock_path = tmp_path / "s.pth"
    if len(str(sock_path)) < 100 and hasattr(socket, "AF_UNIX"):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(sock_path))
            with pytest.raises(CheckpointError, match="socket.*regular file"):
                read_checkpoint(sock_path)
        finally:
            s.close()


def test_missing_file_and_broken_symlink(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    link = tmp_path / "link.pth"
    link.symlink_to(tmp_path / "gone.pth")
    with pytest.raises(FileNotFoundError, match="symbolic link.*gone.pth"):
        read_checkpoint(link)


def test_bytes_path(tmp_path):
    path = saved(tmp_path)
    dst = model(1)
    res = load_checkpoint(dst, os.fsencode(str(path)))
    assert res.layout == "official" and same_weights(dst, model(0))
    assert read_checkpoint(os.fsencode(str(path))).keys() == model(0).state_dict().keys()


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
def test_integer_tensor_for_a_float_parameter_is_refused():
    src = model(0).state_dict()
    sd = dict(src)
    sd["head.weight"] = (sd["head.weight"] * 100).long()
    sd["norm.bias"] = sd["norm.bias"] > 0
    dst = model(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as ei:
        load_checkpoint(dst, sd)
    msg = str(ei.value)
    assert "head.weight (checkpoint torch.int64, model torch.float32)" in msg
    assert "norm.bias (checkpoint torch.bool, model torch.float32)" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    res = load_checkpoint(dst, sd, strict=False)  # non-strict: skipped and reported, the rest loaded
    assert sorted(k for k, _, _ in res.mismatched_dtypes) == ["head.weight", "norm.bias"]
    assert torch.equal(dst.head.weight, before["head.weight"])
    assert torch.equal(dst.norm.weight, src["norm.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_precisions_are_accepted(dtype):
    sd = {k: v.to(dtype) for k, v in model(0).state_dict().items()}
    dst = model(1)
    load_checkpoint(dst, sd)
    assert all(torch.equal(a, b.float()) for a, b in zip(dst.state_dict().values(), sd.values()))


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, 3, ["focalnet_tiny_lrf"], b"focalnet_tiny_lrf"])
def test_create_model_name_must_be_a_str(bad):
    with pytest.raises(TypeError, match="name"):
        focalnet.create_model(bad)
    with pytest.raises(TypeError, match="name"):
        focalnet.model_config(bad)
