// pybind11 module focalnet_kernels._C: build information and the native focal-context backends.
// No libtorch: every tensor arrives as a pointer plus sizes and element strides (focal_context.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "focal_context.h"

#ifndef FOCALNET_VERSION
#define FOCALNET_VERSION "0.0.0"
#endif
#ifndef FOCALNET_CUDA_ARCHS
#define FOCALNET_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using focalnet::FocalContextArgs;

PYBIND11_MODULE(_C, m) {
  m.doc() = "FocalNet native kernels (CPU and, when built with nvcc, CUDA)";

  py::dict info;
  info["version"] = FOCALNET_VERSION;
  py::list backends;
  backends.append("cpu");
#ifdef FOCALNET_WITH_CUDA
  backends.append("cuda");
#endif
  info["backends"] = backends;
  info["cuda_archs"] = std::string(FOCALNET_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  m.attr("BUILD_INFO") = info;

  py::class_<FocalContextArgs>(m, "FocalContextArgs")
      .def(py::init<>())
      .def_readwrite("B", &FocalContextArgs::B)
      .def_readwrite("H", &FocalContextArgs::H)
      .def_readwrite("W", &FocalContextArgs::W)
      .def_readwrite("C", &FocalContextArgs::C)
      .def_readwrite("L", &FocalContextArgs::L)
      .def_readwrite("ksize", &FocalContextArgs::ksize)
      .def_readwrite("dtype", &FocalContextArgs::dtype)
      .def_readwrite("normalize", &FocalContextArgs::normalize)
      .def_readwrite("deterministic", &FocalContextArgs::deterministic)
      .def_readwrite("global_term", &FocalContextArgs::global_term)
      .def_readwrite("ctx", &FocalContextArgs::ctx)
      .def_readwrite("ctx_stride", &FocalContextArgs::ctx_stride)
      .def_readwrite("gates", &FocalContextArgs::gates)
      .def_readwrite("gates_stride", &FocalContextArgs::gates_stride)
      .def_readwrite("weight", &FocalContextArgs::weight)
      .def_readwrite("out", &FocalContextArgs::out)
      .def_readwrite("pooled", &FocalContextArgs::pooled)
      .def_readwrite("grad_out", &FocalContextArgs::grad_out)
      .def_readwrite("grad_out_stride", &FocalContextArgs::grad_out_stride)
      .def_readwrite("grad_ctx", &FocalContextArgs::grad_ctx)
      .def_readwrite("grad_gates", &FocalContextArgs::grad_gates)
      .def_readwrite("grad_weight", &FocalContextArgs::grad_weight)
      .def_readwrite("workspace", &FocalContextArgs::workspace)
      .def_readwrite("workspace_bytes", &FocalContextArgs::workspace_bytes)
      .def_readwrite("stream", &FocalContextArgs::stream);

  // The heavy functions release the GIL: they touch no Python object.
  m.def("focal_context_workspace_bytes_cpu", &focalnet::focal_context_workspace_bytes_cpu,
        py::arg("args"), py::arg("backward"));
  m.def("focal_context_fwd_cpu", &focalnet::focal_context_fwd_cpu, py::arg("args"),
        py::call_guard<py::gil_scoped_release>());
  m.def("focal_context_bwd_cpu", &focalnet::focal_context_bwd_cpu, py::arg("args"),
        py::call_guard<py::gil_scoped_release>());
  m.def("focal_context_cpu_isa", &focalnet::focal_context_cpu_isa);
#ifdef FOCALNET_WITH_CUDA
  m.def("focal_context_workspace_bytes_cuda", &focalnet::focal_context_workspace_bytes_cuda,
        py::arg("args"), py::arg("backward"));
  m.def("focal_context_fwd_cuda", &focalnet::focal_context_fwd_cuda, py::arg("args"),
        py::call_guard<py::gil_scoped_release>());
  m.def("focal_context_bwd_cuda", &focalnet::focal_context_bwd_cuda, py::arg("args"),
        py::call_guard<py::gil_scoped_release>());
  m.def("focal_context_fwd_plan_cuda", &focalnet::focal_context_fwd_plan_cuda, py::arg("args"));
  m.def("focal_context_bwd_plan_cuda", &focalnet::focal_context_bwd_plan_cuda, py::arg("args"));
#endif
}
