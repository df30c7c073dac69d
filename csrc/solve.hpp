// Exact capacity-constrained client-expert assignment: the solver behind fedmoe_kernels.assign
// (docs/design.md, Ops).
//
// Problem. Scores S [N clients x E experts] (row-major float or double; S_ij = -inf forbids a pair),
// experts per client c_i and clients per expert u_j. Choose pairs x_ij in {0, 1} with sum_j x_ij <= c_i,
// sum_i x_ij <= u_j and no forbidden pair, maximising first the number of pairs and then the total score:
// a max-weight maximum b-matching, a min-cost flow whose LP is totally unimodular (certificate.hpp).
//
// Algorithm. Nothing reads the dense matrix more than a few times: each client works on a candidate
// list, its best experts by reduced score S_ij - p_j at expert prices p (candidates.hpp, one blocked pass
// over S that also rejects NaN and +inf), and the certificate proves the answer on the full matrix.
//
// 1. Saturating case (sum c <= sum u and every client has c_i allowed experts: nearly every FL round).
//    A dummy client takes the spare places, and the balanced transportation problem is solved by an
//    epsilon-scaling auction (transport.hpp; Bertsekas and Castanon's auction for transportation
//    problems, bids for similar persons) on the candidate lists, a stale list being rescanned. Start
//    prices (start_prices.hpp): the caller's warm start after one reverse-auction step that lowers the
//    overpriced experts (reverse.hpp), else zero prices where few experts are contested, else the prices
//    of a row sample solved the same way (recursively), else zero at a coarse epsilon. The final prices
//    and client values are the LP duals; the result is certified as below (method "auction").
// 2. General case (clients left short, or every start of the auction stalls). A forward auction
//    (auction.hpp) from zero, warm or sampled prices moves the prices near equilibrium and picks the
//    candidates; successive shortest paths (ssp.hpp: Dijkstra on reduced costs, from the auction's
//    holdings) solve the candidate graph exactly as a min-cost flow with a costly "short" arc per client
//    (the most pairs first, then the best score); node potentials give the duals (method "flow").
//    Small problems (N E <= dense_limit) keep every allowed pair as a candidate and start cold.
// 3. Certificate (certificate.hpp): a reduced-cost scan of every pair against the duals and a residual
//    search for augmenting paths from clients left short. Pairs that violate either join the candidate
//    graph and step 2's flow solver runs again from the previous solution and duals ("rounds"), until
//    none is left: the result is then optimal on the full matrix.
//
// Complexity. Each candidate selection, reverse step and certificate is one pass over S: O(N E /
// threads) (threads over rows). The auctions run on lists of c_i + O(extra) experts with bid budgets
// proportional to the demand sum c + N per phase (SolverOptions, options.hpp), so their work is about
// O((sum c + N) log) per phase plus row rescans; the flow solver is O(A (m + n log n)) for A augmentations
// on a candidate graph of m arcs and n = N + E + 1 nodes, A being the pairs the start leaves unplaced.
// Memory: O(sum c + N extra + E) beyond S, which is read in place.
//
// References. D. P. Bertsekas, D. A. Castanon, "The auction algorithm for the transportation problem",
// Annals of Operations Research 20 (1989). D. P. Bertsekas, "Auction algorithms for network flow
// problems: a tutorial introduction", Computational Optimization and Applications 1 (1992). R. K. Ahuja,
// T. L. Magnanti, J. B. Orlin, "Network Flows" (1993), ch. 9 (successive shortest paths, reduced costs).
// A. Schrijver, "Combinatorial Optimization" (2003), ch. 21 (b-matchings, total unimodularity).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "candidates.hpp"
#include "certificate.hpp"
#include "ssp.hpp"
#include "start_prices.hpp"
#include "transport.hpp"

namespace fedmoe {

// The saturating case (every client can get its c_i experts, as in almost every FL round): the
// epsilon-scaling auction of transport.hpp on candidate lists, then the full-matrix certificate. Returns
// false (X untouched) when the case does not apply, the auction stalls or the certificate fails; the
// caller then runs the general method.
template <typename T>
bool solve_saturating(const SubProblem<T>& P, const std::vector<double>& warm, int extra, int threads,
                      Solution& X) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  Candidates C;
  double eps = 0.0;
  bool zero_start = false;
  auto A = saturating_auction(P, warm, 0, extra, threads, C, eps, zero_start);
  if (!A) return false;
  Solution Y;
  std::vector<double> value;
  A->finish(Y.off, Y.expert, value);
  // Duals of the original problem from those of the balanced one (expert prices pi, client values v, and
  // the dummy's -theta with theta the lowest price): p_j = pi_j - theta >= 0 and a_r + lambda = v_r + theta.
  // The dual gap is then at most epsilon per unit of capacity. Experts without capacity and clients
  // without demand cost nothing in the dual objective: their duals just cover every score.
  const std::vector<double>& pi = A->price();
  const double theta = P.lowest_price(pi);
  Y.lambda = std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < R; ++r)
    if (P.c[r] > 0) Y.lambda = std::min(Y.lambda, value[r] + theta);
  if (Y.lambda == std::numeric_limits<double>::infinity()) Y.lambda = 0.0;
  const double cover = std::max(0.0, C.hi - Y.lambda);  // S_rj - lambda never exceeds it
  Y.p.resize(E);
  for (int64_t j = 0; j < E; ++j) Y.p[j] = P.u[j] > 0 ? pi[j] - theta : cover;
  Y.a.resize(R);
  for (int64_t r = 0; r < R; ++r) Y.a[r] = P.c[r] > 0 ? value[r] + theta - Y.lambda : cover;
  Y.pairs = static_cast<int64_t>(Y.expert.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = Y.off[r]; k < Y.off[r + 1]; ++k) Y.objective += P.score(r, Y.expert[k]);
  Y.tolerance = 2.0 * eps;
  std::vector<std::pair<int64_t, int32_t>> pairs;
  if (!certify(P, Y, C, extra, threads, pairs)) return false;
  Y.rounds = 1;
  Y.auction = true;
  X = std::move(Y);
  return true;
}

// The certified solution of P (the method: top of this file).
template <typename T>
Solution solve(const SubProblem<T>& P, std::vector<double> price, int extra, int threads) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  Solution held;
  Candidates C;
  if (R * E <= P.dense_limit) {
    if (price.empty()) price.assign(E, 0.0);
    C = select_candidates(P, price, extra, true, threads);
  } else {
    Solution X;
    if (solve_saturating(P, price, extra, threads, X)) return X;
    C = start_candidates(P, price, extra, threads, held);
  }
  BMatching M = make_matching(P, C, price);
  M.start(price, held.off, held.expert);
  Solution X;
  int rounds = 0;
  int64_t added = 0;
  for (;;) {
    ++rounds;
    M.solve();
    X = extract(P, M);
    std::vector<std::pair<int64_t, int32_t>> pairs;
    if (certify(P, X, C, extra, threads, pairs)) break;
    std::sort(pairs.begin(), pairs.end());
    pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
    const int64_t fresh = add_candidates(C, pairs);
    if (fresh == 0) break;  // cannot happen with exact arithmetic; never loop forever
    added += fresh;
    // Restart from this solution and its duals on the larger graph: clients drop the pairs the new arcs
    // beat, and the exact solver moves them along short paths.
    M = make_matching(P, C, X.p);
    M.start(X.p, X.off, X.expert);
  }
  X.rounds = rounds;
  X.pairs_added = added;
  return X;
}

// Every row of the dense row-major [N, E] scores `S` as a problem, c and u clamped to [0, E] and [0, N].
template <typename T>
SubProblem<T> whole_problem(const T* S, int64_t N, int64_t E, const int64_t* c, const int64_t* u,
                            int64_t dense_limit) {
  SubProblem<T> P{S, E, dense_limit, std::vector<int64_t>(N), std::vector<int32_t>(N), std::vector<int32_t>(E)};
  std::iota(P.rows.begin(), P.rows.end(), 0);
  for (int64_t i = 0; i < N; ++i) P.c[i] = static_cast<int32_t>(std::clamp<int64_t>(c[i], 0, E));
  for (int64_t j = 0; j < E; ++j) P.u[j] = static_cast<int32_t>(std::clamp<int64_t>(u[j], 0, N));
  return P;
}

}  // namespace fedmoe
