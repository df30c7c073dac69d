// fedmoe_kernels._assign: exact capacity-constrained client-expert assignment (DESIGN.md §3.1).
//
// max-weight maximum b-matching: choose pairs (i, j) with at most c_i per client, u_j per expert, no pair
// where S_ij = -inf; first as many pairs as possible, then the largest total score.
//
// 1. Prices. Expert prices p (duals of the expert capacities) come from the caller (warm start) or from
//    solving a row sample of the problem with proportionally scaled expert capacities (recursively).
// 2. Candidates. Per client the best c_i + extra experts by reduced score S_ij - p_j (one pass over S,
//    which also rejects NaN/+inf). Small problems keep every allowed pair.
// 3. Sparse solve (flow.hpp). Max flow by Dinic, then min cost at that flow value by cost scaling on
//    integer-scaled scores. Node prices give LP duals (a_i, p_j, lambda).
// 4. Certificate on the full matrix. A reduced-cost scan finds pairs with S_ij > a_i + p_j + lambda that
//    are not chosen (they would improve the score), and a residual search from clients left short finds
//    augmenting paths through non-candidate pairs (they would add a pair). Both join the candidate graph,
//    and 3-4 repeat until neither exists: the result is then optimal on the full matrix.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#include "auction.hpp"
#include "candidates.hpp"
#include "flow.hpp"

namespace py = pybind11;

namespace fedmoe {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Row sample fraction (1 / kSampleStride) for estimating prices of a large cold problem.
constexpr int64_t kSampleStride = 8;
// Integer resolution of a score range: costs are round(score * K), K = 2^kScoreBits / range.
constexpr int kScoreBits = 28;

struct Solution {
  std::vector<int64_t> off;      // per row, CSR into `expert`
  std::vector<int32_t> expert;   // chosen experts, ascending within a row
  std::vector<double> a, p;      // duals: client (rows), expert
  double lambda = 0.0;
  double resolution = 0.0;       // score resolution of the integer costs (certificate tolerance)
  int64_t pairs = 0;
  double objective = 0.0, dual_objective = 0.0;
  bool certified = false;
  int rounds = 0;
  int64_t pairs_added = 0;
};

// Solve the candidate graph exactly (max flow, then min cost at that value). Prices warm-start the
// cost scaling; `prefer` (previous solution, may be empty) seeds the initial flow.
template <typename T>
Solution solve_candidates(const SubProblem<T>& P, const Candidates& C, const std::vector<double>& price,
                          const Solution& prefer) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  const int s = 0, t = static_cast<int>(R + E + 1);
  const auto client = [](int64_t r) { return static_cast<int32_t>(1 + r); };
  const auto expert = [R](int64_t j) { return static_cast<int32_t>(1 + R + j); };
  const int n = static_cast<int>(R + E + 2);

  double lo = kInf, hi = -kInf;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = C.off[r]; k < C.off[r + 1]; ++k) {
      const double x = P.S[P.rows[r] * E + C.expert[k]];
      lo = std::min(lo, x), hi = std::max(hi, x);
    }
  if (!(hi >= lo)) lo = hi = 0.0;  // no candidate pairs at all
  const double range = hi > lo ? hi - lo : 1.0;
  const double K = std::ldexp(1.0, kScoreBits) / range;  // integer units per score unit
  const int64_t alpha = n + 1;                          // cost multiplier that makes epsilon = 1 exact
  const double unit = K * static_cast<double>(alpha);  // price units per score unit

  std::vector<ArcSpec> arcs;
  arcs.reserve(R + C.expert.size() + E);
  for (int64_t r = 0; r < R; ++r) arcs.push_back({s, client(r), P.c[r], 0});
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = C.off[r]; k < C.off[r + 1]; ++k) {
      const double x = P.S[P.rows[r] * E + C.expert[k]];
      arcs.push_back({client(r), expert(C.expert[k]), 1, std::llround((hi - x) * K) * alpha});
    }
  for (int64_t j = 0; j < E; ++j) arcs.push_back({expert(j), t, P.u[j], 0});
  FlowGraph G(n, arcs);

  // Initial flow: previous choices first, then each client's best candidates while capacity lasts.
  std::vector<int32_t> load(E, 0), used(R, 0);
  auto take = [&](int64_t r, int64_t arc) {
    const int32_t j = G.head(arc) - expert(0);
    if (G.residual(arc) == 0 || used[r] >= P.c[r] || load[j] >= P.u[j]) return;
    G.push(G.reverse(G.begin(client(r))), 1);  // s -> client
    G.push(arc, 1);
    G.push(G.end(G.head(arc)) - 1, 1);  // expert -> t is the expert's last arc
    ++used[r], ++load[j];
  };
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t b = G.begin(client(r)) + 1, e = G.end(client(r));
      if (pass == 0 && !prefer.off.empty()) {
        for (int64_t k = prefer.off[r]; k < prefer.off[r + 1]; ++k)
          for (int64_t a = b; a < e; ++a)
            if (G.head(a) == expert(prefer.expert[k])) take(r, a);
      } else if (pass == 1) {
        for (int64_t a = b; a < e; ++a) take(r, a);
      }
    }
  G.max_flow(s, t);
  // With every client full, the source arcs carry c_i in every maximum flow: freeze them so that the
  // source (a hub joined to every client) never takes part in the cost scaling.
  int64_t flow = 0, demand = 0;
  for (int64_t r = 0; r < R; ++r) flow += G.residual(G.begin(client(r))), demand += P.c[r];
  const bool frozen = flow == demand;
  if (frozen)
    for (int64_t r = 0; r < R; ++r) G.freeze(G.begin(client(r)));

  // Node prices from expert prices: p_j = (pi_t - pi_j) / unit. Clients sit at their c_i-th best arc.
  // Experts left with spare capacity sit at price 0 in every optimum where they keep it.
  std::vector<int64_t> pi(n, 0);
  for (int64_t j = 0; j < E; ++j)
    if (G.residual(G.end(expert(j)) - 1) == 0) pi[expert(j)] = -std::llround(price[j] * unit);
  int64_t pi_s = INT64_MAX;
  std::vector<int64_t> vals;
  for (int64_t r = 0; r < R; ++r) {
    vals.clear();
    for (int64_t a = G.begin(client(r)) + 1; a < G.end(client(r)); ++a) vals.push_back(pi[G.head(a)] - G.cost(a));
    if (vals.empty()) continue;
    const int64_t kth = std::min<int64_t>(std::max(P.c[r], 1), static_cast<int64_t>(vals.size())) - 1;
    std::nth_element(vals.begin(), vals.begin() + kth, vals.end(), std::greater<int64_t>());
    pi[client(r)] = vals[kth];
    pi_s = std::min(pi_s, vals[kth]);
  }
  pi[s] = pi_s == INT64_MAX ? 0 : pi_s;
  G.min_cost(pi, G.optimality_epsilon(pi));
  if (frozen && R > 0)  // the source price is free: the tightest duals put it at the lowest client price
    pi[s] = *std::min_element(pi.begin() + client(0), pi.begin() + client(R));

  Solution out;
  out.off.assign(R + 1, 0);
  out.a.resize(R);
  out.p.resize(E);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t a = G.begin(client(r)) + 1; a < G.end(client(r)); ++a)
      if (G.residual(a) == 0) out.expert.push_back(G.head(a) - expert(0));
    std::sort(out.expert.begin() + out.off[r], out.expert.end());
    out.off[r + 1] = static_cast<int64_t>(out.expert.size());
    out.a[r] = std::max(0.0, static_cast<double>(pi[client(r)] - pi[s]) / unit);
  }
  for (int64_t j = 0; j < E; ++j) out.p[j] = std::max(0.0, static_cast<double>(pi[t] - pi[expert(j)]) / unit);
  out.lambda = hi + static_cast<double>(pi[s] - pi[t]) / unit;
  out.pairs = static_cast<int64_t>(out.expert.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = out.off[r]; k < out.off[r + 1]; ++k) out.objective += P.score(r, out.expert[k]);
  out.resolution = std::max(1.0 / K, 1e-15 * std::max(std::abs(hi), std::abs(lo)));
  return out;
}

// Full-matrix certificate: sum of the box duals xi (for the dual objective) and the violating pairs.
template <typename T>
double reduced_cost_scan(const SubProblem<T>& P, const Solution& X, double tol, int max_per_row, int threads,
                         std::vector<std::pair<int64_t, int32_t>>& violations) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  const int nt = std::max(1, threads);
  std::vector<double> xi(nt, 0.0);
  std::vector<std::vector<std::pair<int64_t, int32_t>>> found(nt);
  parallel_rows(R, threads, [&](int th, int64_t lo, int64_t hi) {
    std::vector<char> chosen(E, 0);
    std::vector<std::pair<double, int32_t>> row_viol;
    double sum = 0.0;
    for (int64_t r = lo; r < hi; ++r) {
      const T* row = P.S + P.rows[r] * E;
      const double base = X.a[r] + X.lambda;
      for (int64_t k = X.off[r]; k < X.off[r + 1]; ++k) chosen[X.expert[k]] = 1;
      row_viol.clear();
      constexpr int64_t B = 16;
      for (int64_t j0 = 0; j0 < E; j0 += B) {
        const int64_t jn = std::min(E, j0 + B);
        double best = -kInf;
        for (int64_t j = j0; j < jn; ++j) best = std::max(best, static_cast<double>(row[j]) - X.p[j]);
        if (!(best > base)) continue;
        for (int64_t j = j0; j < jn; ++j) {
          const double v = static_cast<double>(row[j]) - X.p[j] - base;
          if (!(v > 0.0)) continue;
          sum += v;
          if (v > tol && !chosen[j]) row_viol.emplace_back(-v, static_cast<int32_t>(j));
        }
      }
      for (int64_t k = X.off[r]; k < X.off[r + 1]; ++k) chosen[X.expert[k]] = 0;
      if (static_cast<int>(row_viol.size()) > max_per_row) {
        std::partial_sort(row_viol.begin(), row_viol.begin() + max_per_row, row_viol.end());
        row_viol.resize(max_per_row);
      }
      for (const auto& v : row_viol) found[th].emplace_back(r, v.second);
    }
    xi[th] = sum;
  });
  for (auto& f : found) violations.insert(violations.end(), f.begin(), f.end());
  return std::accumulate(xi.begin(), xi.end(), 0.0);
}

// Residual search on the full matrix from clients with spare capacity; adds the non-candidate pairs of
// every augmenting path it finds. Returns false if there is none (the number of pairs is maximal).
template <typename T>
bool augmenting_paths(const SubProblem<T>& P, const Solution& X, const Candidates& C,
                      std::vector<std::pair<int64_t, int32_t>>& pairs) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  std::vector<int32_t> load(E, 0);
  for (int32_t j : X.expert) ++load[j];
  std::vector<int64_t> holder_off(E + 1, 0);
  for (int32_t j : X.expert) ++holder_off[j + 1];
  for (int64_t j = 0; j < E; ++j) holder_off[j + 1] += holder_off[j];
  std::vector<int64_t> holder(X.expert.size()), fill(holder_off.begin(), holder_off.end() - 1);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = X.off[r]; k < X.off[r + 1]; ++k) holder[fill[X.expert[k]]++] = r;

  std::vector<int64_t> queue, expert_parent(E, -1), client_parent(R, -2);  // -2: unvisited, -1: root
  for (int64_t r = 0; r < R; ++r) {
    const int64_t have = X.off[r + 1] - X.off[r];
    if (have < P.c[r] && have < C.allowed[r]) {
      client_parent[r] = -1;
      queue.push_back(r);
    }
  }
  if (queue.empty()) return false;
  std::vector<char> chosen(E, 0);
  std::vector<int32_t> ends;
  for (size_t q = 0; q < queue.size(); ++q) {
    const int64_t r = queue[q];
    const T* row = P.S + P.rows[r] * E;
    for (int64_t k = X.off[r]; k < X.off[r + 1]; ++k) chosen[X.expert[k]] = 1;
    for (int64_t j = 0; j < E; ++j) {
      if (chosen[j] || expert_parent[j] >= 0 || !(row[j] > -std::numeric_limits<T>::infinity())) continue;
      expert_parent[j] = r;
      if (load[j] < P.u[j]) {
        ends.push_back(static_cast<int32_t>(j));
        continue;
      }
      for (int64_t h = holder_off[j]; h < holder_off[j + 1]; ++h)
        if (client_parent[holder[h]] == -2) {
          client_parent[holder[h]] = j;
          queue.push_back(holder[h]);
        }
    }
    for (int64_t k = X.off[r]; k < X.off[r + 1]; ++k) chosen[X.expert[k]] = 0;
  }
  for (int32_t j : ends) {
    for (int64_t cur = j; cur >= 0;) {
      const int64_t r = expert_parent[cur];
      pairs.emplace_back(r, static_cast<int32_t>(cur));
      cur = client_parent[r];
    }
  }
  return !ends.empty();
}

// Auction epsilon: range * 2^-kAuctionEpsBits. One phase from the warm (or sampled) prices: epsilon
// scaling would restart the holdings and leave overpriced experts with spare capacity, which costs the
// exact solver more than it saves.
constexpr int kAuctionEpsBits = 18;

// Candidate lists for P from an auction started at `price` (updated in place); the auction's holdings
// go to `holdings` (they seed the flow solver).
template <typename T>
Candidates auction_candidates(const SubProblem<T>& P, std::vector<double>& price, int extra, int threads,
                              Solution& holdings) {
  Candidates C = select_candidates(P, price, extra, false, threads);
  Auction<T> A(P, price, C, extra);
  int64_t demand = 0;
  for (int32_t c : P.c) demand += c;
  const int64_t max_bids = 8 * (demand + static_cast<int64_t>(P.rows.size()));
  A.run(std::ldexp(A.range(), -kAuctionEpsBits), max_bids);
  A.finish(C, holdings.off, holdings.expert);
  return C;
}

template <typename T>
std::vector<double> price_estimate(const SubProblem<T>& P, int extra, int threads);

// Prices of a large cold problem from a row sample with proportionally scaled expert capacities.
template <typename T>
std::vector<double> sample_prices(const SubProblem<T>& P, int extra, int threads) {
  SubProblem<T> Q{P.S, P.E, P.dense_limit, {}, {}, {}};
  int64_t demand = 0, sampled = 0;
  for (size_t r = 0; r < P.rows.size(); ++r) {
    // Deterministic and order-free; salted by the subset size so that each level samples afresh.
    uint64_t h = (static_cast<uint64_t>(P.rows[r]) + P.rows.size() * 0xD1B54A32D192ED03ull) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    demand += P.c[r];
    if (h % kSampleStride == 0) {
      Q.rows.push_back(P.rows[r]);
      Q.c.push_back(P.c[r]);
      sampled += P.c[r];
    }
  }
  // Largest-remainder rounding keeps the total scaled capacity.
  const double f = demand > 0 ? static_cast<double>(sampled) / static_cast<double>(demand) : 0.0;
  std::vector<double> frac(P.E);
  Q.u.resize(P.E);
  int64_t total = 0;
  double want = 0.0;
  for (int64_t j = 0; j < P.E; ++j) {
    const double x = P.u[j] * f;
    Q.u[j] = static_cast<int32_t>(std::floor(x));
    frac[j] = x - Q.u[j];
    total += Q.u[j];
    want += x;
  }
  std::vector<int32_t> order(P.E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return frac[x] > frac[y]; });
  for (int64_t k = 0; k < static_cast<int64_t>(std::llround(want)) - total && k < P.E; ++k) ++Q.u[order[k]];
  for (auto& x : Q.u) x = std::min<int32_t>(x, static_cast<int32_t>(Q.rows.size()));
  if (Q.rows.empty() || Q.rows.size() == P.rows.size()) return std::vector<double>(P.E, 0.0);
  return price_estimate(Q, extra, threads);
}

// Expert prices of P without a certificate: exact duals when P is small, else auction prices.
template <typename T>
std::vector<double> price_estimate(const SubProblem<T>& P, int extra, int threads) {
  std::vector<double> price(P.E, 0.0);
  if (static_cast<int64_t>(P.rows.size()) * P.E <= P.dense_limit)
    return solve_candidates(P, select_candidates(P, price, extra, true, threads), price, Solution{}).p;
  price = sample_prices(P, extra, threads);
  Solution ignored;
  auction_candidates(P, price, extra, threads, ignored);
  return price;
}

// The certified solution of P (see the top of this file).
template <typename T>
Solution solve(const SubProblem<T>& P, std::vector<double> price, int extra, int threads) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  Solution X, previous;
  Candidates C;
  if (R * E <= P.dense_limit) {
    if (price.empty()) price.assign(E, 0.0);
    C = select_candidates(P, price, extra, true, threads);
  } else {
    if (price.empty()) price = sample_prices(P, extra, threads);
    C = auction_candidates(P, price, extra, threads, previous);
  }
  int rounds = 0;
  int64_t added = 0;
  for (;;) {
    ++rounds;
      X = solve_candidates(P, C, price, previous);
    std::vector<std::pair<int64_t, int32_t>> pairs;
    const double xi = reduced_cost_scan(P, X, 4.0 * X.resolution, std::max(extra, 1), threads, pairs);
    augmenting_paths(P, X, C, pairs);
    if (pairs.empty()) {
      double dual = X.lambda * static_cast<double>(X.pairs) + xi;
      for (int64_t r = 0; r < R; ++r) dual += P.c[r] * X.a[r];
      for (int64_t j = 0; j < E; ++j) dual += P.u[j] * X.p[j];
      X.dual_objective = dual;
      // Dual feasible (no violating pair) and a zero gap up to the integer resolution of the costs.
      const double slack = 8.0 * X.resolution * static_cast<double>(X.pairs + R + E);
      X.certified = dual - X.objective <= slack + 1e-9 * std::abs(X.objective);
      break;
    }
    const int64_t fresh = add_candidates(C, std::move(pairs));
    if (fresh == 0) break;  // cannot happen with exact arithmetic; never loop forever
    added += fresh;
    price = X.p;
    previous = std::move(X);
  }
  X.rounds = rounds;
  X.pairs_added = added;
  return X;
}

template <typename T>
py::dict solve_py(py::array_t<T, py::array::c_style> scores, py::array_t<int64_t, py::array::c_style> c,
                  py::array_t<int64_t, py::array::c_style> u, py::object warm, int extra, int threads,
                  int64_t dense_limit) {
  const int64_t N = scores.shape(0), E = scores.shape(1);
  SubProblem<T> P{scores.data(), E, dense_limit, std::vector<int64_t>(N), std::vector<int32_t>(N), std::vector<int32_t>(E)};
  std::iota(P.rows.begin(), P.rows.end(), 0);
  for (int64_t i = 0; i < N; ++i) P.c[i] = static_cast<int32_t>(std::min<int64_t>(c.data()[i], E));
  for (int64_t j = 0; j < E; ++j) P.u[j] = static_cast<int32_t>(std::min<int64_t>(u.data()[j], N));
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
  return out;
}

}  // namespace
}  // namespace fedmoe

PYBIND11_MODULE(_assign, m) {
  m.doc() = "Exact capacity-constrained client-expert assignment (see fedmoe_kernels.assign).";
  m.def("solve", &fedmoe::solve_py<float>, py::arg("scores"), py::arg("client_capacity"),
        py::arg("expert_capacity"), py::arg("warm_prices"), py::arg("extra"), py::arg("threads"), py::arg("dense_limit"));
  m.def("solve", &fedmoe::solve_py<double>, py::arg("scores"), py::arg("client_capacity"),
        py::arg("expert_capacity"), py::arg("warm_prices"), py::arg("extra"), py::arg("threads"), py::arg("dense_limit"));
}
