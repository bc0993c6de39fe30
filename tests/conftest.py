import os

# Triton kernels run on CPU tensors through the interpreter; it must be switched on before triton is
# imported anywhere. On a GPU machine (the GPU suite) the kernels compile for the device instead.
def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_old_triton_interpreter() -> None:
    """Workaround for Triton < 3.8's interpreter with numpy >= 2.4 (the GPU machine's Triton 3.6 when
    its kernels run interpreted, e.g. the CI leg with Triton 3.6).

    While a kernel runs, the interpreter gives tl.tensor an ``__index__`` of
    ``int(self.handle.data)`` (triton/runtime/interpreter.py, _patch_lang_tensor). A scalar such as
    ``tl.program_id(0)`` is held as a 1-element 1-D numpy array, and numpy 2.4 removed int() of arrays
    with ndim > 0, so ``range(pid, total, nprog)`` in a kernel raises "TypeError: only 0-dimensional
    arrays can be converted to Python scalars". Triton 3.8 changed that line to
    ``int(self.handle.data.squeeze())``; this wraps _patch_lang_tensor to install the same ``__index__``
    after the original (it is registered in the same restore scope, so it is undone with the rest when
    the kernel returns). Nothing is changed for Triton >= 3.8, for compiled kernels, or when the
    interpreter's layout is not the one this was written against (then the tests show the error)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import re
        import triton
        from triton.runtime import interpreter
    except Exception:
        return
    m = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    if not m or (int(m.group(1)), int(m.group(2))) >= (3, 8):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_focalnet_squeeze_index", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._focalnet_squeeze_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_patch_old_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@pytest.fixture
def forbid_eager_dwconv(monkeypatch):
    """Make every eager depthwise conv raise while the test runs: proves a kernel did the work."""
    real_conv, real_convt = F.conv2d, F.conv_transpose2d

    def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if groups > 1:
            raise AssertionError("eager depthwise conv2d ran: the fused path fell back to eager")
        return real_conv(input, weight, bias, stride, padding, dilation, groups)

    def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        if groups > 1:
            raise AssertionError("eager depthwise conv_transpose2d ran: the fused path fell back to eager")
        return real_convt(input, weight, bias, stride, padding, output_padding, groups, dilation)

    monkeypatch.setattr(F, "conv2d", conv2d)
    monkeypatch.setattr(F, "conv_transpose2d", conv_transpose2d)
    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    yield


@pytest.fixture
def forbid_eager_dwconv_later(monkeypatch):
    """A context manager form of forbid_eager_dwconv, for tests that run the eager model first."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        with monkeypatch.context() as m:
            real_conv = F.conv2d

            def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
                if groups > 1:
                    raise AssertionError("eager depthwise conv2d ran: the fused path fell back to eager")
                return real_conv(input, weight, bias, stride, padding, dilation, groups)

            m.setattr(F, "conv2d", conv2d)
            yield
    return _ctx


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def backend(monkeypatch):
    """Force a focal_context backend for one test: backend('triton')."""
    def _set(name):
        monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", name)
    return _set


def rel_err(a, b):
    """||a - b|| / ||b|| in fp64 on the CPU (any device, any dtype)."""
    a = a.detach().cpu().double()
    b = b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def kernel_backends():
    """The fused backends that can run on CPU tensors here: the native CPU kernel (when the
    extension is built) and Triton in its interpreter (when TRITON_INTERPRET=1)."""
    from focalnet_kernels import ops
    names = []
    if ops._native_available("cpu"):
        names.append("cpu")
    if ops.triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names
