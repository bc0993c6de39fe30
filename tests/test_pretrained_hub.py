"""create_model(..., pretrained=True / tag / repo) through huggingface_hub, without network: the test
lays out a hub cache of its own (HF_HOME in tmp_path, HF_HUB_OFFLINE=1) the way huggingface_hub does
(models--<owner>--<name>/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>})."""
import hashlib
import io
import os
import sys

import pytest
import torch

import focalnet
from focalnet import CheckpointError, PretrainedNotFoundError, create_model, hub

pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_checkpoint import HF_VARIANTS, make_hf, needs_transformers, rel, to_timm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1))  # shrinks any registered variant
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def source(name="focalnet_tiny_lrf", seed=0, **kw):
    torch.manual_seed(seed)
    m = create_model(name, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def safetensors_bytes(state_dict):
    return safetensors_torch.save({k: v.contiguous() for k, v in state_dict.items()})


def torch_bytes(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def put(cache, repo, filename, data, symlink=True):
    """Store `data` as `filename` of `repo` at revision main, as huggingface_hub's cache does."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    if symlink:
        (snap / filename).symlink_to(os.path.relpath(blob, snap))
    else:
        (snap / filename).write_bytes(data)
    return blob


def put_timm(cache, model, name="focalnet_tiny_lrf", tag="ms_in1k", **kw):
    sd = to_timm(model.state_dict(), use_postln=bool(getattr(model, "use_postln", False)))
    return put(cache, f"timm/{name}.{tag}", "model.safetensors", safetensors_bytes(sd), **kw)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache named by HF_HOME (set after huggingface_hub was imported), offline."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-home" / "hub"


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


x = torch.randn(2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
def test_pretrained_true_loads_the_default_tag_offline(cache):
    src = source()
    put_timm(cache, src)
    import huggingface_hub.constants as hc
    assert not str(hc.HF_HUB_CACHE).startswith(str(cache.parent))  # read at import: stale, we do not use it
    m = create_model("focalnet_tiny_lrf", pretrained=True, **TINY).eval()
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    cfg = m.pretrained_cfg
    assert cfg["hf_hub_id"] == "timm/focalnet_tiny_lrf.ms_in1k" and cfg["tag"] == "ms_in1k"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000 == m.num_classes
    fused = create_model("focalnet_tiny_lrf", pretrained=True, use_fused=True, **TINY)
    assert same(fused.state_dict(), src.state_dict())


def test_every_spelling_of_the_source(cache):
    src = source()
    put_timm(cache, src)
    for spelling in ("ms_in1k", "focalnet_tiny_lrf.ms_in1k", "hf-hub:timm/focalnet_tiny_lrf.ms_in1k",
                     "timm/focalnet_tiny_lrf.ms_in1k", f"hf-hub:timm/focalnet_tiny_lrf.ms_in1k@{COMMIT}"):
        m = create_model("focalnet_tiny_lrf", pretrained=spelling, **TINY)
        assert same(m.state_dict(), src.state_dict()), spelling
        assert m.pretrained_cfg["tag"] == "ms_in1k"


def test_hf_hub_cache_wins_over_hf_home(cache, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    src = source()
    put_timm(other, src)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))  # HF_HOME's cache stays empty
    m = create_model("focalnet_tiny_lrf", pretrained=True, **TINY)
    assert same(m.state_dict(), src.state_dict())


def test_hub_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.hub_cache_dir() == str(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.hub_cache_dir() == str(tmp_path / "legacy")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hub_cache_dir() == str(tmp_path / "new")


def test_missing_entry_says_how_to_get_it(cache):
    with pytest.raises(PretrainedNotFoundError) as ei:
        create_model("focalnet_tiny_lrf", pretrained=True, **TINY)
    msg = str(ei.value)
    assert "timm/focalnet_tiny_lrf.ms_in1k" in msg and str(cache) in msg
    assert "hf download timm/focalnet_tiny_lrf.ms_in1k model.safetensors" in msg and "HF_HUB_OFFLINE" in msg
    assert isinstance(ei.value, CheckpointError) and isinstance(ei.value, FileNotFoundError)


def test_damaged_cache_entry_is_refused(cache):
    blob = put_timm(cache, source())
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside a tensor: the safetensors header still checks out
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"(?s)expected SHA-256 .*damaged.*" + blob.name):
        create_model("focalnet_tiny_lrf", pretrained=True, **TINY)


def test_cache_without_symlinks(cache):
    """Where the cache holds copies (no symlinks) there is no blob name to check against; it still loads."""
    src = source()
    put_timm(cache, src, symlink=False)
    assert same(create_model("focalnet_tiny_lrf", pretrained=True, **TINY).state_dict(), src.state_dict())


def test_tags_and_classes():
    assert hub.resolve_pretrained("focalnet_large_fl3", True)["num_classes"] == 21842
    assert hub.resolve_pretrained("focalnet_large_fl3", True)["input_size"] == (3, 384, 384)
    assert hub.resolve_pretrained("focalnet_large_fl3", True)["crop_pct"] == 1.0
    assert hub.resolve_pretrained("focalnet_huge_fl3", "ms_in22k")["input_size"] == (3, 224, 224)
    assert set(hub.PRETRAINED_TAGS) == set(focalnet.list_models())
    with pytest.raises(ValueError, match="ms_in22k.*focalnet_tiny_lrf.*ms_in1k"):
        create_model("focalnet_tiny_lrf", pretrained="ms_in22k", **TINY)
    with pytest.raises(ValueError, match="focalnet_base_srf weights, not focalnet_tiny_lrf"):
        create_model("focalnet_tiny_lrf", pretrained="hf-hub:microsoft/focalnet-base", **TINY)
    for nothing in (None, False):
        m = create_model("focalnet_tiny_lrf", pretrained=nothing, **TINY)
        assert m.pretrained_cfg["hf_hub_id"] == "timm/focalnet_tiny_lrf.ms_in1k"
    with pytest.raises(FileNotFoundError, match="not found"):  # a path stays a path
        create_model("focalnet_tiny_lrf", pretrained="weights/focalnet.pth", **TINY)


def test_num_classes_follow_the_tag_unless_given(cache):
    huge = source("focalnet_huge_fl4", num_classes=0)  # timm's huge fl4 weights have no classifier
    put_timm(cache, huge, "focalnet_huge_fl4", "ms_in22k")
    m = create_model("focalnet_huge_fl4", pretrained=True, **TINY).eval()
    assert m.num_classes == 0 and m.pretrained_cfg["num_classes"] == 0
    with torch.no_grad():
        assert torch.equal(m(x), huge(x))

    src = source()
    put_timm(cache, src)
    m = create_model("focalnet_tiny_lrf", pretrained=True, num_classes=10, **TINY).eval()
    assert m.head.out_features == 10  # the checkpoint's 1000-class head is left out, the backbone loaded
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), src.forward_features(x))


def test_repository_we_do_not_know(cache):
    src = source(num_classes=37)
    put(cache, "someone/focalnet-tiny-birds", "model.safetensors", safetensors_bytes(src.state_dict()))
    for spelling in ("hf-hub:someone/focalnet-tiny-birds", "someone/focalnet-tiny-birds"):
        m = create_model("focalnet_tiny_lrf", pretrained=spelling, **TINY).eval()
        assert m.num_classes == 37 and m.pretrained_cfg["hf_hub_id"] == "someone/focalnet-tiny-birds"
        with torch.no_grad():
            assert torch.equal(m(x), src(x))


@needs_transformers
def test_microsoft_repository_pytorch_model_bin(cache):
    """microsoft/focalnet-tiny-lrf: Hugging Face transformers' layout in pytorch_model.bin (no safetensors)."""
    hf_kw, our_kw = HF_VARIANTS["tiny_lrf"]
    hf = make_hf(hf_kw, num_labels=1000)
    put(cache, "microsoft/focalnet-tiny-lrf", "pytorch_model.bin", torch_bytes(hf.state_dict()))
    m = create_model("focalnet_tiny_lrf", pretrained="hf-hub:microsoft/focalnet-tiny-lrf", embed_dim=32,
                     depths=(1, 1, 2, 1)).eval()
    assert m.pretrained_cfg["hf_hub_id"] == "microsoft/focalnet-tiny-lrf" and m.num_classes == 1000
    with torch.no_grad():
        assert rel(m(x), hf(x).logits) < 1e-5


def test_without_huggingface_hub(monkeypatch, cache):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r'pip install "\.\[hub\]"'):
        create_model("focalnet_tiny_lrf", pretrained=True, **TINY)
    # paths and state dicts do not need it
    src = source()
    assert same(create_model("focalnet_tiny_lrf", pretrained=src.state_dict(), **TINY).state_dict(),
                src.state_dict())
