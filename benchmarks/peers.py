"""What a CPU deployer would run instead of our fused model: the eager model under torch.compile
(Inductor with freezing) and the eager model exported to ONNX and run in ONNX Runtime.

Both are built on their first call (that call's time is reported as compile_s, like a compile), from
the same eager module the other members of the benchmark group use, so the weights are the same.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch
from torch import nn


def compile_inference(module: nn.Module, backend: str = "inductor", freezing: bool = False):
    """torch.compile for inference; freezing=True (Inductor only) folds the weights into the graph as
    constants, which is what lets Inductor pick its packed CPU GEMMs (the deployment setting on CPUs)."""
    options = {"freezing": True} if (freezing and backend == "inductor") else None
    return torch.compile(module, dynamic=False, backend=backend, options=options)


def onnxruntime_skip_reason() -> Optional[str]:
    """None when ONNX export and ONNX Runtime are importable, else why not."""
    for mod in ("onnxruntime", "onnxscript", "onnx"):
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or a broken install
            return f"{mod} is not importable ({type(e).__name__}: {e}); install the [bench] extra"
    return None


class OnnxRuntimeModel:
    """Callable like the module it wraps: on the first call, exports `module` (torch.onnx.export,
    dynamo exporter, the call's input shape fixed) to a temporary file and opens an ONNX Runtime
    session on the CPU with as many intra-op threads as torch uses; every call feeds the input as a
    contiguous float array and returns the first output as a torch tensor."""

    def __init__(self, module: nn.Module, threads: Optional[int] = None):
        self.module = module
        self.threads = threads or torch.get_num_threads()
        self.session = None
        self._input_name = None
        self.model_bytes: Optional[int] = None

    def _build(self, x: torch.Tensor) -> None:
        import onnxruntime as ort
        with tempfile.TemporaryDirectory(prefix="focalnet-onnx-") as d:
            path = os.path.join(d, "model.onnx")
            with torch.no_grad():
                torch.onnx.export(self.module, (x.contiguous(),), path, dynamo=True, verbose=False)
            self.model_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # the model (and any external-data file next to it) is read here, before the folder goes
            self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"OnnxRuntimeModel runs on the CPU; got a {x.device.type} tensor")
        if self.session is None:
            self._build(x)
        (out,) = self.session.run(None, {self._input_name: x.detach().float().contiguous().numpy()})[:1]
        return torch.from_numpy(out)
