// The Python module `loom`: Loom's sequence-parallel operators for PyTorch
// programs (a trainer launched by torchrun / torch.distributed.run).
//
// What it offers: SequenceLayout, and the operators as autograd functions on
// this rank's shard of the sequence, collective over a torch.distributed
// process group:
//   lasp2_linear_attention(q, k, v, layout, group, method="lasp2", decay=None, ...)
//   attention(q, k, v, layout, group, method="ring"|"allgather"|"ulysses"|"usp", window=0, ...)
//   gated_delta(q, k, v, beta, log_alpha, layout, group, method="lasp2", ...)
// They are Loom's C++ autograd functions: the returned tensors carry their
// backward, which runs the backward collectives over the same group.
// Who calls it: python/examples/ and users' trainers. Ordering rules: every
// rank of the group calls the same operators in the same order, forward and
// backward (Loom's CommOrder chains them so that backward runs them in reverse
// on every rank); reset_order() starts a new chain when a graph was built and
// dropped without backward.
//
// How a Python ProcessGroup reaches C++: torch's own bindings register
// c10d::ProcessGroup with pybind11, and Debian's libtorch_python.so uses
// pybind11's internals "v4_gcc_libstdcpp_cxxabi1017", the same as this module
// compiled with Debian's pybind11 2.10 and GCC 12; the module imports torch
// first, so the argument converts like any registered class. It is taken by
// reference (torch registers its holder as a custom intrusive_ptr wrapper,
// which another module must not reinterpret) and re-owned with
// intrusive_ptr::reclaim_copy. One C10dCommunicator per group is kept for the
// process's lifetime (counters and watchdog sequence numbers accumulate).
// Errors: Loom's typed errors become loom.LoomError (RuntimeError) and its
// subclasses loom.ConfigError (also ValueError), loom.CommError,
// loom.CommTimeout, loom.UnsupportedError, with the same messages; argument
// checks (TORCH_CHECK) become RuntimeError without the C++ backtrace.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/utils/pybind.h>

#include <mutex>
#include <unordered_map>

#include "loom/parallel/gated_delta/gated_delta.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/c10d_communicator.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/sequence_layout.h"
#include "loom/runtime/core/error.h"

namespace py = pybind11;

namespace loom::python {
namespace {

// The store torch.distributed made `group` with (its own prefix store), or
// null: where torch keeps it moved between versions (1.x: _pg_map, 2.x:
// _world.pg_map), both map the group to (backend, store).
c10::intrusive_ptr<c10d::Store> store_of(const py::object& group) {
  py::object c10d_module = py::module_::import("torch.distributed.distributed_c10d");
  py::object pg_map = py::none();
  if (py::hasattr(c10d_module, "_world") && py::hasattr(c10d_module.attr("_world"), "pg_map"))
    pg_map = c10d_module.attr("_world").attr("pg_map");
  else if (py::hasattr(c10d_module, "_pg_map"))
    pg_map = c10d_module.attr("_pg_map");
  if (pg_map.is_none() || !pg_map.contains(group)) return {};
  py::object entry = pg_map[group];
  if (!py::isinstance<py::tuple>(entry) || py::len(entry) < 2 || entry[py::int_(1)].is_none()) return {};
  return c10::intrusive_ptr<c10d::Store>::reclaim_copy(&entry[py::int_(1)].cast<c10d::Store&>());
}

// One communicator per process group object, kept alive with it. Sub-groups
// (split(); the scans that run right to left use one) are Gloo groups over
// the group's store.
std::shared_ptr<C10dCommunicator> communicator_for(const py::object& group_object) {
  static std::mutex mutex;
  static std::unordered_map<const c10d::ProcessGroup*, std::shared_ptr<C10dCommunicator>> communicators;
  if (!py::isinstance<c10d::ProcessGroup>(group_object))
    throw py::type_error("group: expected a torch.distributed process group (e.g. dist.group.WORLD or "
                         "dist.new_group(...)), got " + std::string(py::str(py::type::of(group_object))));
  c10d::ProcessGroup& group = group_object.cast<c10d::ProcessGroup&>();
  std::lock_guard<std::mutex> lock(mutex);
  auto& comm = communicators[&group];
  if (!comm) {
    // The name prefixes the sub-groups' keys in the group's own store.
    comm = C10dCommunicator::create(c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&group),
                                    store_of(group_object), "torch-group");
  }
  return comm;
}

std::shared_ptr<C10dCommunicator> checked_communicator(const py::object& group, const SequenceLayout& layout,
                                                       const char* op) {
  auto comm = communicator_for(group);
  if (comm->size() != layout.world_size())
    throw ConfigError(std::string(op) + ": the layout is for " + std::to_string(layout.world_size()) +
                      " ranks but the process group has " + std::to_string(comm->size()) + " (rank " +
                      std::to_string(comm->rank()) + " on host " + host_name() + ")");
  return comm;
}

at::Tensor optional_tensor(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

at::Tensor lasp2_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const SequenceLayout& layout, const py::object& group, const std::string& method,
                                  const c10::optional<at::Tensor>& decay, bool normalize, double eps,
                                  int64_t block_size, const c10::optional<at::Tensor>& log_gate,
                                  const c10::optional<at::Tensor>& doc_start) {
  auto comm = checked_communicator(group, layout, "lasp2_linear_attention");
  linear_attention::LinearAttentionOptions options;
  options.block_size = block_size;
  options.decay = optional_tensor(decay);
  options.normalize = normalize;
  options.eps = eps;
  options.log_gate = optional_tensor(log_gate);
  options.doc_start = optional_tensor(doc_start);
  const auto parsed = linear_attention::parse_method(method);
  py::gil_scoped_release no_gil;
  return CommOrder::close(
      linear_attention::sequence_parallel_linear_attention(q, k, v, layout, comm, parsed, options));
}

py::object attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const SequenceLayout& layout,
                     const py::object& group, const std::string& method, int64_t window, double scale, int64_t block,
                     const c10::optional<at::Tensor>& doc_start, bool return_lse, int ulysses_degree) {
  auto comm = checked_communicator(group, layout, "attention");
  const auto parsed = softmax_attention::parse_method(method);
  if (parsed == softmax_attention::SoftmaxMethod::kOffload)
    throw UnsupportedError("attention: method 'offload' needs Loom's memory nodes (loom-train); from Python use "
                           "'ring', 'allgather', 'ulysses' or 'usp'");
  if (parsed == softmax_attention::SoftmaxMethod::kLocal && comm->size() != 1)
    throw ConfigError("attention: method 'local' is for a group of one rank, this one has " +
                      std::to_string(comm->size()));
  softmax_attention::AttentionSpec spec;
  spec.window = window;
  spec.scale = scale;
  spec.block = block;
  std::pair<at::Tensor, at::Tensor> result;
  {
    py::gil_scoped_release no_gil;
    result = softmax_attention::attention_with_lse(q, k, v, layout, comm, parsed, spec, nullptr,
                                                   optional_tensor(doc_start), ulysses_degree);
    result.first = CommOrder::close(result.first);
  }
  if (return_lse) return py::make_tuple(result.first, result.second);
  return py::cast(result.first);
}

at::Tensor gated_delta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                       const at::Tensor& log_alpha, const SequenceLayout& layout, const py::object& group,
                       const std::string& method, int64_t block_size, const c10::optional<at::Tensor>& doc_start) {
  auto comm = checked_communicator(group, layout, "gated_delta");
  gated_delta::GatedDeltaOptions options;
  options.block_size = block_size;
  options.doc_start = optional_tensor(doc_start);
  const auto parsed = linear_attention::parse_method(method);
  py::gil_scoped_release no_gil;
  return CommOrder::close(
      gated_delta::sequence_parallel_gated_delta_rule(q, k, v, beta, log_alpha, layout, comm, parsed, options));
}

py::dict comm_stats(const py::object& group) {
  auto comm = communicator_for(group);
  py::dict out;
  for (int i = 0; i < static_cast<int>(OpType::kCount); ++i) {
    const auto op = static_cast<OpType>(i);
    const auto& c = comm->stats()[op];
    if (c.calls == 0) continue;
    py::dict entry;
    entry["calls"] = c.calls;
    entry["bytes_sent"] = c.bytes_sent;
    entry["bytes_received"] = c.bytes_received;
    out[op_type_name(op)] = entry;
  }
  return out;
}

}  // namespace
}  // namespace loom::python

PYBIND11_MODULE(loom, m) {
  using namespace loom;
  // torch's bindings (Tensor, ProcessGroup) must be registered before any
  // argument of theirs is converted.
  py::module_::import("torch");
  py::module_::import("torch.distributed");

  m.doc() = "Loom's sequence-parallel operators (LASP-2 linear attention, ring / all-gather softmax attention, "
            "Gated DeltaNet) as autograd functions over a torch.distributed process group.";

  static py::exception<LoomError> loom_error(m, "LoomError", PyExc_RuntimeError);
  static py::exception<CommError> comm_error(m, "CommError", loom_error.ptr());
  static py::exception<CommTimeout> comm_timeout(m, "CommTimeout", comm_error.ptr());
  static py::exception<UnsupportedError> unsupported_error(m, "UnsupportedError", loom_error.ptr());
  // ConfigError is also a ValueError: a bad argument value, by Python's conventions.
  py::object config_bases = py::make_tuple(loom_error, py::handle(PyExc_ValueError));
  static PyObject* config_type = PyErr_NewException("loom.ConfigError", config_bases.ptr(), nullptr);
  if (config_type == nullptr) throw py::error_already_set();
  m.add_object("ConfigError", py::handle(config_type));
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ConfigError& e) {
      PyErr_SetString(config_type, e.what());
    } catch (const CommTimeout& e) {
      PyErr_SetString(comm_timeout.ptr(), e.what());
    } catch (const CommError& e) {
      PyErr_SetString(comm_error.ptr(), e.what());
    } catch (const UnsupportedError& e) {
      PyErr_SetString(unsupported_error.ptr(), e.what());
    } catch (const LoomError& e) {
      PyErr_SetString(loom_error.ptr(), e.what());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  py::class_<SequenceLayout>(m, "SequenceLayout",
                             "Which rank owns which tokens: 'contiguous' (chunk r on rank r) or 'zigzag' (chunks r "
                             "and 2W-1-r), padding the sequence up to whole chunks.")
      .def(py::init([](const std::string& kind, int64_t global_len, int world_size) {
             return SequenceLayout(parse_layout_kind(kind), global_len, world_size);
           }),
           py::arg("kind"), py::arg("global_len"), py::arg("world_size"))
      .def_property_readonly("kind", [](const SequenceLayout& l) { return std::string(layout_kind_name(l.kind())); })
      .def_property_readonly("world_size", &SequenceLayout::world_size)
      .def_property_readonly("global_len", &SequenceLayout::global_len)
      .def_property_readonly("padded_len", &SequenceLayout::padded_len)
      .def_property_readonly("num_chunks", &SequenceLayout::num_chunks)
      .def_property_readonly("chunk_len", &SequenceLayout::chunk_len)
      .def_property_readonly("local_len", &SequenceLayout::local_len)
      .def("chunks_of", &SequenceLayout::chunks_of, py::arg("rank"))
      .def("global_positions", &SequenceLayout::global_positions, py::arg("rank"))
      .def("valid_mask", &SequenceLayout::valid_mask, py::arg("rank"))
      .def("shard", &SequenceLayout::shard, py::arg("tensor"), py::arg("rank"), py::arg("dim") = 1,
           py::arg("pad_value") = 0.0, "This rank's part of a whole-sequence tensor (differentiable).")
      .def("unshard", &SequenceLayout::unshard, py::arg("locals"), py::arg("dim") = 1,
           "The whole sequence from every rank's local tensor (differentiable).")
      .def("__repr__", &SequenceLayout::describe);

  m.def("lasp2_linear_attention", &python::lasp2_linear_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("layout"), py::arg("group"), py::arg("method") = "lasp2", py::arg("decay") = py::none(),
        py::arg("normalize") = false, py::arg("eps") = 1e-6, py::arg("block_size") = 64,
        py::arg("log_gate") = py::none(), py::arg("doc_start") = py::none(),
        "Causal linear attention on this rank's shard: q, k [B, H, n, d_k], v [B, H, n, d_v] (already feature-mapped), "
        "method 'lasp2' | 'lasp2_allscan' | 'lasp1', decay [H] in (0, 1], log_gate [B, H, n] <= 0, doc_start [B, n].");
  m.def("attention", &python::attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("layout"),
        py::arg("group"), py::arg("method") = "ring", py::arg("window") = 0, py::arg("scale") = 0.0,
        py::arg("block") = 128, py::arg("doc_start") = py::none(), py::arg("return_lse") = false,
        py::arg("ulysses_degree") = 0,
        "Causal softmax attention on this rank's shard: q [B, Hq, n, d], k, v [B, Hkv, n, d], method 'ring' | "
        "'allgather' | 'ulysses' | 'usp' (all-to-all inside groups of ulysses_degree consecutive ranks, ring "
        "across them; 0: the whole group), window > 0 for sliding-window attention, scale 0 for 1/sqrt(d).");
  m.def("gated_delta", &python::gated_delta, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("beta"),
        py::arg("log_alpha"), py::arg("layout"), py::arg("group"), py::arg("method") = "lasp2",
        py::arg("block_size") = 64, py::arg("doc_start") = py::none(),
        "Gated DeltaNet on this rank's shard: q, k [B, H, n, d_k] (k L2-normalised), v [B, H, n, d_v], beta and "
        "log_alpha [B, H, n].");
  m.def("reset_order", &CommOrder::reset,
        "Starts a new chain of ordered communications (after a graph was dropped without backward).");
  m.def("comm_stats", &python::comm_stats, py::arg("group"),
        "Calls and bytes per operation that Loom moved over this group (by each operation's definition).");
}
