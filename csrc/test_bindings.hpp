// Python bindings of solver internals, for the tests (tests/test_candidates.py, tests/test_reverse.py):
// select_rows (candidates.hpp's select_row on every row) and lower_unclaimed (reverse.hpp's reverse step).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "candidates.hpp"
#include "reverse.hpp"
#include "solve.hpp"

namespace fedmoe {

namespace py = pybind11;

// select_row on every row of `scores` at `price` (for tests): ids [N, L] (-1 past count), count [N], bound [N].
template <typename T>
py::tuple select_rows_py(py::array_t<T, py::array::c_style> scores, py::array_t<T, py::array::c_style> price,
                         int64_t L) {
  if (scores.ndim() != 2 || price.ndim() != 1 || price.shape(0) != scores.shape(1) || L < 1)
    throw std::invalid_argument("scores must be 2-D, price must have E entries and L must be >= 1");
  const int64_t N = scores.shape(0), E = scores.shape(1);
  py::array_t<int32_t> ids({N, L});
  py::array_t<int64_t> count(N);
  py::array_t<T> bound(N);
  std::fill_n(ids.mutable_data(), N * L, -1);
  RowScratch<T> scratch;
  for (int64_t r = 0; r < N; ++r) {
    const RowTop<T> top = select_row(scores.data() + r * E, price.data(), E, L, ids.mutable_data() + r * L, scratch);
    count.mutable_data()[r] = top.count;
    bound.mutable_data()[r] = top.bound;
  }
  return py::make_tuple(ids, count, bound);
}

// lower_unclaimed of reverse.hpp on every row of `scores` (for tests): the lowered prices [E].
template <typename T>
py::array_t<double> lower_unclaimed_py(py::array_t<T, py::array::c_style> scores,
                                       py::array_t<int64_t, py::array::c_style> c,
                                       py::array_t<int64_t, py::array::c_style> u,
                                       py::array_t<double, py::array::c_style> price, int threads) {
  if (scores.ndim() != 2 || c.ndim() != 1 || u.ndim() != 1 || price.ndim() != 1 || c.shape(0) != scores.shape(0) ||
      u.shape(0) != scores.shape(1) || price.shape(0) != scores.shape(1))
    throw std::invalid_argument("scores must be 2-D [N, E], experts_per_client [N], clients_per_expert and price [E]");
  const int64_t E = scores.shape(1);
  const SubProblem<T> P = whole_problem(scores.data(), scores.shape(0), E, c.data(), u.data(), 0);
  const std::vector<double> lowered = lower_unclaimed(P, std::vector<double>(price.data(), price.data() + E),
                                                      std::max(1, threads));
  return py::array_t<double>(E, lowered.data());
}

}  // namespace fedmoe
