// fedmoe_kernels._assign: the Python module of the assignment solver, pybind11 glue only. The solver,
// its problem, algorithm, complexity and references: solve.hpp; its tuning constants: options.hpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "solve.hpp"
#include "test_bindings.hpp"

namespace py = pybind11;

namespace fedmoe {
namespace {

// solve() on the dense [N, E] `scores` (c [N], u [E], optional warm prices [E]) as a dict of arrays.
template <typename T>
py::dict solve_py(py::array_t<T, py::array::c_style> scores, py::array_t<int64_t, py::array::c_style> c,
                  py::array_t<int64_t, py::array::c_style> u, py::object warm, int extra, int threads,
                  int64_t dense_limit) {
  const int64_t N = scores.shape(0), E = scores.shape(1);
  const SubProblem<T> P = whole_problem(scores.data(), N, E, c.data(), u.data(), dense_limit);
  std::vector<double> price;
  if (!warm.is_none()) {
    auto w = warm.cast<py::array_t<double, py::array::c_style>>();
    price.assign(w.data(), w.data() + E);
  }
  Solution X;
  {
    py::gil_scoped_release release;
    X = solve(P, std::move(price), extra, threads);
  }
  py::array_t<int64_t> clients(X.pairs), experts(X.pairs);
  auto ci = clients.mutable_data();
  auto ei = experts.mutable_data();
  for (int64_t r = 0, k = 0; r < N; ++r)
    for (int64_t q = X.off[r]; q < X.off[r + 1]; ++q, ++k) ci[k] = r, ei[k] = X.expert[q];
  py::dict out;
  out["clients"] = clients;
  out["experts"] = experts;
  out["objective"] = X.objective;
  out["client_dual"] = py::array_t<double>(N, X.a.data());
  out["expert_price"] = py::array_t<double>(E, X.p.data());
  out["flow_dual"] = X.lambda;
  out["dual_objective"] = X.dual_objective;
  out["certified"] = X.certified;
  out["rounds"] = X.rounds;
  out["pairs_added"] = X.pairs_added;
  out["method"] = X.auction ? "auction" : "flow";
  return out;
}

}  // namespace
}  // namespace fedmoe

PYBIND11_MODULE(_assign, m) {
  m.doc() = "Exact capacity-constrained client-expert assignment (see fedmoe_kernels.assign).";
  m.def("solve", &fedmoe::solve_py<float>, py::arg("scores"), py::arg("experts_per_client"),
        py::arg("clients_per_expert"), py::arg("warm_prices"), py::arg("extra"), py::arg("threads"), py::arg("dense_limit"));
  m.def("solve", &fedmoe::solve_py<double>, py::arg("scores"), py::arg("experts_per_client"),
        py::arg("clients_per_expert"), py::arg("warm_prices"), py::arg("extra"), py::arg("threads"), py::arg("dense_limit"));
  m.def("select_rows", &fedmoe::select_rows_py<float>, py::arg("scores"), py::arg("price"), py::arg("L"));
  m.def("select_rows", &fedmoe::select_rows_py<double>, py::arg("scores"), py::arg("price"), py::arg("L"));
  m.def("lower_unclaimed", &fedmoe::lower_unclaimed_py<float>, py::arg("scores"), py::arg("experts_per_client"),
        py::arg("clients_per_expert"), py::arg("price"), py::arg("threads"));
  m.def("lower_unclaimed", &fedmoe::lower_unclaimed_py<double>, py::arg("scores"), py::arg("experts_per_client"),
        py::arg("clients_per_expert"), py::arg("price"), py::arg("threads"));
}
