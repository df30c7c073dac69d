// A solution with its LP duals, and the certificate that proves it optimal on the full score matrix.
//
// LP of the b-matching (x in [0, 1]^(N x E), pairs with S_ij = -inf excluded):
//   max sum S_ij x_ij  s.t.  sum_j x_ij <= c_i (dual a_i >= 0),  sum_i x_ij <= u_j (dual p_j >= 0),
//                            sum x = K (dual lambda, free),  x_ij <= 1 (dual xi_ij = max(0, S_ij - a_i - p_j - lambda)).
// The duals come from the flow solver's node potentials (extract) or the saturating auction's prices
// (solve.hpp). The certificate (certify) checks them against every pair of the dense matrix in one
// parallel reduced-cost scan, O(N E / threads), and searches the residual graph for an augmenting path
// from a client left short (breadth-first, O(N E)): no violating pair and no augmenting path prove the
// pair count K maximal and the score optimal among assignments of K pairs, up to the rounding tolerance.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "candidates.hpp"
#include "ssp.hpp"

namespace fedmoe {

// A solution of a (sub)problem with its LP duals and its certificate's verdict.
struct Solution {
  std::vector<int64_t> off;      // per row, CSR into `expert`
  std::vector<int32_t> expert;   // chosen experts, ascending within a row
  std::vector<double> a, p;      // duals: client (rows), expert
  double lambda = 0.0;
  double tolerance = 0.0;        // rounding allowance of the duals (certificate tolerance)
  int64_t pairs = 0;
  double objective = 0.0, dual_objective = 0.0;
  bool certified = false;
  bool auction = false;  // found by the saturating auction (else by the flow solver)
  int rounds = 0;
  int64_t pairs_added = 0;
};

// The b-matching problem of the candidate lists C of P.
template <typename T>
BMatching make_matching(const SubProblem<T>& P, const Candidates& C, const std::vector<double>& price) {
  const int64_t R = static_cast<int64_t>(P.rows.size());
  std::vector<double> score(C.expert.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = C.off[r]; k < C.off[r + 1]; ++k) score[k] = P.score(r, C.expert[k]);
  // The short arc's cost beats the score any augmenting path (at most min(R, E) + 1 pairs) can gain, and
  // keeps every client's starting potential (a reduced score) above -big.
  const bool any = C.hi >= C.lo;  // false when no pair is allowed at all
  const double lo = any ? C.lo : 0.0, hi = any ? C.hi : 0.0, range = hi - lo;
  const double top_price = price.empty() ? 0.0 : *std::max_element(price.begin(), price.end());
  const double big = (static_cast<double>(std::min<int64_t>(R, P.E)) + 2.0) * range + std::abs(lo) +
                     std::abs(hi) + top_price + 1.0;
  return BMatching(C.off, C.expert, std::move(score), P.c, P.u, big);
}

// The chosen pairs, objective and LP duals of a solved matching.
template <typename T>
Solution extract(const SubProblem<T>& P, const BMatching& M) {
  const int64_t R = M.clients(), E = M.experts();
  Solution out;
  out.off.assign(R + 1, 0);
  out.a.resize(R);
  out.p.resize(E);
  bool any_short = false;
  const double pt = M.potential_sink();
  double lambda = std::numeric_limits<double>::infinity(), magnitude = std::abs(pt);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t a = M.off()[r]; a < M.off()[r + 1]; ++a)
      if (M.used(a)) out.expert.push_back(M.expert()[a]);
    std::sort(out.expert.begin() + out.off[r], out.expert.end());
    out.off[r + 1] = static_cast<int64_t>(out.expert.size());
    any_short |= M.short_units(r) > 0;
    if (P.c[r] > 0) lambda = std::min(lambda, M.potential_client(r) - pt);
    magnitude = std::max(magnitude, std::abs(M.potential_client(r)));
  }
  // A short client is worth -big per missing pair; with none, the tightest lambda makes some a_i zero.
  out.lambda = any_short ? -M.big() : (lambda < std::numeric_limits<double>::infinity() ? lambda : 0.0);
  for (int64_t r = 0; r < R; ++r) out.a[r] = std::max(0.0, M.potential_client(r) - pt - out.lambda);
  for (int64_t j = 0; j < E; ++j) {
    out.p[j] = std::max(0.0, pt - M.potential_expert(j));
    magnitude = std::max(magnitude, std::abs(M.potential_expert(j)));
  }
  out.pairs = static_cast<int64_t>(out.expert.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = out.off[r]; k < out.off[r + 1]; ++k) out.objective += P.score(r, out.expert[k]);
  out.tolerance = 1e-12 * (magnitude + M.big());
  return out;
}

// Full-matrix certificate: sum of the box duals xi (for the dual objective) and the violating pairs.
template <typename T>
double reduced_cost_scan(const SubProblem<T>& P, const Solution& X, double tol, int max_per_row, int threads,
                         std::vector<std::pair<int64_t, int32_t>>& violations) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  constexpr double kInf = std::numeric_limits<double>::infinity();
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

// Certificate of X on the full matrix: true (and X's dual objective and verdict set) when no pair
// violates the duals by more than X.tolerance and no augmenting path exists; otherwise `pairs` gets the
// violating pairs and the non-candidate pairs of augmenting paths.
template <typename T>
bool certify(const SubProblem<T>& P, Solution& X, const Candidates& C, int extra, int threads,
             std::vector<std::pair<int64_t, int32_t>>& pairs) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  const double xi = reduced_cost_scan(P, X, X.tolerance, std::max(extra, 1), threads, pairs);
  augmenting_paths(P, X, C, pairs);
  if (!pairs.empty()) return false;
  double dual = X.lambda * static_cast<double>(X.pairs) + xi;
  for (int64_t r = 0; r < R; ++r) dual += P.c[r] * X.a[r];
  for (int64_t j = 0; j < E; ++j) dual += P.u[j] * X.p[j];
  X.dual_objective = dual;
  // Dual feasible (no violating pair) and a zero gap up to rounding.
  const double slack = 8.0 * X.tolerance * static_cast<double>(X.pairs + R + E);
  X.certified = dual - X.objective <= slack + 1e-9 * std::abs(X.objective);
  return true;
}

}  // namespace fedmoe
