"""Export: torch.export keeps the focal-context op in the graph with correct fake shapes; ONNX export
decomposes it into standard ops and the graph runs in onnxruntime, matching the model."""
import numpy as np
import pytest
import torch

import focalnet_kernels as fk


class _Modulation(torch.nn.Module):
    def __init__(self, C=8, ks=(3, 5)):
        super().__init__()
        self.C = C
        self.f = torch.nn.Linear(C, 2 * C + len(ks) + 1)
        self.kernels = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(C, 1, k, k) / k) for k in ks])

    def forward(self, x):
        y = self.f(x)
        return fk.focal_context(y[..., self.C : 2 * self.C], y[..., 2 * self.C :], list(self.kernels))


def test_torch_export_keeps_op():
    m = _Modulation().eval()
    x = torch.randn(2, 6, 7, 8)
    ep = torch.export.export(m, (x,))
    nodes = [n for n in ep.graph.nodes if "focalnet.focal_context_fwd" in str(n.target)]
    assert len(nodes) == 1
    fake_out = nodes[0].meta["val"][0]
    assert tuple(fake_out.shape) == (2, 6, 7, 8)
    torch.testing.assert_close(ep.module()(x), m(x))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")  # a [test] dependency: present in CI
    pytest.importorskip("onnxscript")
    m = _Modulation().eval()
    x = torch.randn(2, 6, 7, 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True)
    sess = ort.InferenceSession(str(path))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, m(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def _tiny_fused():
    import focalnet
    torch.manual_seed(0)
    return focalnet.create_model("focalnet_tiny_srf", embed_dim=8, depths=(1, 1, 1, 1), num_classes=5,
                                 use_fused=True).eval()


def test_torch_export_fused_model():
    model = _tiny_fused()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    ops_in_graph = [n for n in ep.graph.nodes if "focalnet.focal_context_fwd" in str(n.target)]
    assert len(ops_in_graph) == 4  # one per block
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_fused_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _tiny_fused()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "focalnet.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    sess = ort.InferenceSession(str(path))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
