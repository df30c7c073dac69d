// fedmoe_kernels._assign: exact capacity-constrained client-expert assignment (DESIGN.md §3.1).
//
// max-weight maximum b-matching: choose pairs (i, j) with at most c_i per client, u_j per expert, no pair
// where S_ij = -inf; first as many pairs as possible, then the largest total score.
//
// Saturating case (every client can get its c_i experts; almost every FL round): a dummy client takes the
// spare capacity and the problem becomes a balanced transportation problem, solved by an epsilon-scaling
// auction on per-client candidate lists (transport.hpp), started from the caller's warm prices (after one
// reverse-auction step that lowers the overpriced ones, reverse.hpp), from zero (few experts contested) or
// from the prices of a row sample (solved the same way, recursively). Its prices give the LP duals, and
// the certificate below proves the result optimal on the full matrix.
//
// General case (or if the auction stalls):
// 1. Prices. Expert prices p (duals of the expert capacities): a forward auction from zero first; if
//    contention makes that slow, from the caller's warm start (e.g. the previous round's duals) or from
//    solving a row sample with proportionally scaled expert capacities (recursively).
// 2. Candidates. Per client the best c_i + extra experts by reduced score S_ij - p_j (one pass over S,
//    which also rejects NaN/+inf), refined by a forward auction (auction.hpp) that moves the prices close to
//    equilibrium. Small problems keep every allowed pair and start cold.
// 3. Exact solve on the candidate graph (ssp.hpp): successive shortest paths from the auction's holdings,
//    with a costly "short" arc per client so that the most pairs come first and then the best score.
//    Node potentials give the LP duals (a_i, p_j, lambda).
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
#include <memory>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#include "auction.hpp"
#include "candidates.hpp"
#include "reverse.hpp"
#include "ssp.hpp"
#include "transport.hpp"

namespace py = pybind11;

namespace fedmoe {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Row sample fraction (1 / kSampleStride) for estimating prices of a large cold problem; samples of at
// most kSampleBaseEntries entries are solved exactly (every pair a candidate).
constexpr int64_t kSampleStride = 8;
constexpr int64_t kSampleBaseEntries = int64_t{1} << 16;

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

// The auction runs one phase from the warm (or sampled, or zero) prices: epsilon scaling would restart
// the holdings and leave overpriced experts with spare capacity, which costs the exact solver more than
// it saves.
// Bids per unit of demand: the cap of any auction, and the budget of the first, zero-price attempt.
constexpr int64_t kMaxBidsPerUnit = 8;
constexpr int kContestedEpsBits = 18;
constexpr int kColdBidsPerUnit = 1;

// Candidate lists for P from an auction started at `price` (updated in place); the auction's holdings
// go to `holdings` (they seed the exact solver). With `budget` >= 0 the auction gives up after that many
// bids per unit of demand and returns no lists (an empty `off`). A `fine` auction ends within the exact
// solver's tolerance (cheap where few experts are contested); a coarse one (epsilon = range *
// 2^-kContestedEpsBits) converges where many are, at the price of more work for the exact solver.
template <typename T>
Candidates auction_candidates(const SubProblem<T>& P, std::vector<double>& price, int extra, int threads,
                              Solution& holdings, int budget, bool fine) {
  Candidates C = select_candidates(P, price, extra, false, threads);
  Auction<T> A(P, price, C, extra);
  int64_t demand = 0;
  for (int32_t c : P.c) demand += c;
  const int64_t units = demand + static_cast<int64_t>(P.rows.size());
  // Epsilon 0 means within the exact solver's rounding tolerance (1e-13 of its `big`), so that its start
  // keeps every pair the auction holds; else range * 2^-kContestedEpsBits.
  const double eps = fine ? 1e-13 * static_cast<double>(std::min<int64_t>(P.rows.size(), P.E) + 2) * A.range()
                          : std::ldexp(A.range(), -kContestedEpsBits);
  if (!A.run(eps, budget >= 0 ? budget * units : kMaxBidsPerUnit * units) &&
      budget >= 0)
    return Candidates{};
  A.finish(C, holdings.off, holdings.expert);
  return C;
}

template <typename T>
std::vector<double> price_estimate(const SubProblem<T>& P, int extra, int threads);

// A row sample of P (1 in kSampleStride) with proportionally scaled expert capacities.
template <typename T>
SubProblem<T> row_sample(const SubProblem<T>& P) {
  SubProblem<T> Q{P.S, P.E, P.dense_limit, {}, {}, {}};
  int64_t demand = 0, sampled = 0;
  for (size_t r = 0; r < P.rows.size(); ++r) {
    // Deterministic and order-free; salted by the subset size so that each level samples afresh.
    uint64_t h = (static_cast<uint64_t>(P.rows[r]) + P.rows.size() * 0xD1B54A32D192ED03ull) *
                 0x9E3779B97F4A7C15ull;
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
  return Q;
}

// Prices of a large cold problem from a row sample.
template <typename T>
std::vector<double> sample_prices(const SubProblem<T>& P, int extra, int threads) {
  SubProblem<T> Q = row_sample(P);
  if (Q.rows.empty() || Q.rows.size() == P.rows.size()) return std::vector<double>(P.E, 0.0);
  return price_estimate(Q, extra, threads);
}

// Candidates and holdings from an auction: first from zero prices, which suits problems where few experts
// are contested (there, prices carried over from a similar problem mostly overshoot, and a forward auction
// cannot lower them); when that runs out of its bid budget (heavy contention makes a forward auction from
// zero slow), from `price`, the caller's warm start, or else the prices of a row sample.
template <typename T>
Candidates start_candidates(const SubProblem<T>& P, std::vector<double>& price, int extra, int threads,
                            Solution& holdings) {
  std::vector<double> fallback = std::move(price);
  price.assign(P.E, 0.0);
  Candidates C = auction_candidates(P, price, extra, threads, holdings, kColdBidsPerUnit, true);
  if (!C.off.empty()) return C;
  price = fallback.empty() ? sample_prices(P, extra, threads) : std::move(fallback);
  return auction_candidates(P, price, extra, threads, holdings, -1, false);
}

// Expert prices of P without a certificate: exact duals when P is small, else auction prices.
template <typename T>
std::vector<double> price_estimate(const SubProblem<T>& P, int extra, int threads) {
  std::vector<double> price(P.E, 0.0);
  if (static_cast<int64_t>(P.rows.size()) * P.E <= std::max(P.dense_limit, kSampleBaseEntries)) {
    BMatching M = make_matching(P, select_candidates(P, price, extra, true, threads), price);
    M.start(price, {}, {});
    M.solve();
    return extract(P, M).p;
  }
  price = sample_prices(P, extra, threads);
  Solution ignored;
  auction_candidates(P, price, extra, threads, ignored, -1, false);
  return price;
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

// Epsilon-scaling phases of the saturating auction: from scale * 2^-first (eps_scale) down by 2^-kStepBits
// per phase to scale * 2^-last (never below 2^-kFloorBits of the scores' magnitude: smaller raises would
// vanish in rounding). A row sample's auction stops at kSampleBits; a certified solve at half the
// certificate's tolerance.
// From zero prices: fine 2^-kFineBits or coarse 2^-kCoarseBits. From a sample's or the caller's prices:
// fine 2^-kWarmBits, going on at medium 2^-kMediumBits where that stalls, or medium right away (see
// fine_start). A fine phase stalls after kFineBidsPerUnit bids per unit of demand (counting a rescan as
// E/64 bids, about what a 4,096-wide rescan costs), any other after kBidsPerUnit.
constexpr int kFineBits = 15, kCoarseBits = 6, kWarmBits = 19, kMediumBits = 9, kStepBits = 3, kSampleBits = 20;
constexpr int kFloorBits = 42;
constexpr int64_t kFineBidsPerUnit = 16;
constexpr int64_t kNearExact = 400, kSwamped = 16;  // see fine_start
constexpr int64_t kBidsPerUnit = 64;  // per phase; more means the instance does not suit the auction
constexpr int kListFactor = 2;  // auction lists start at c_i + kListFactor * extra: a rescan costs a whole row
constexpr int64_t kSampleMinRows = 4096;  // smaller cold problems start from zero prices

// Candidate lists C of P for the auction, selected at `price`; false if some client has fewer allowed
// experts than c_i (the saturating case does not apply) or no pair is allowed.
template <typename T>
bool auction_lists(const SubProblem<T>& P, const std::vector<double>& price, int extra, int threads, Candidates& C) {
  C = select_candidates(P, price, kListFactor * extra, false, threads);
  for (size_t r = 0; r < P.rows.size(); ++r)
    if (C.allowed[r] < P.c[r]) return false;
  return C.hi >= C.lo;
}

// Demand beyond the expert capacities when each client takes its c_i best listed experts (lists from
// auction_lists): how far the lists' prices are from clearing.
template <typename T>
int64_t excess_demand(const SubProblem<T>& P, const Candidates& C) {
  std::vector<int64_t> wanted(P.E, 0);
  for (size_t r = 0; r < P.rows.size(); ++r)
    for (int64_t k = C.off[r]; k < C.off[r] + P.c[r]; ++k) ++wanted[C.expert[k]];
  int64_t excess = 0;
  for (int64_t j = 0; j < P.E; ++j) excess += std::max<int64_t>(0, wanted[j] - P.u[j]);
  return excess;
}

// The scale of the auction's epsilons: the largest spread of scores within a row. Offsets per row (such as
// the fairness and deadline terms of the alignment scores) change no client's choices, only the overall
// range: on the fair strategy's 100,000 x 4,096 rounds they widened it 2.6x.
inline double eps_scale(const Candidates& C) { return C.spread > 0 ? C.spread : C.range(); }

// Whether an auction from `price` (C: auction_lists at those prices) should open at fine epsilon, not medium:
// when they nearly clear (at most 1 / kNearExact of the demand lands beyond the expert capacities), or when
// a medium epsilon would swamp the clients' preferences (the median row's margin between its c_i-th and
// next listed reduced score is below 1 / kSwamped of it: clients then trade places at every raise).
// Measured on 100,000 x 4,096 instances: replayed alignment rounds (0.6-8.3% excess after the reverse
// step, median margin 0.3-0.4 medium epsilons) took 2.4-4.1 s from medium against 2.8-7.8 s with a fine
// phase first, which stalled on every one; exact prices (0.2% excess, ties) 1.4 s fine against 1.7 s
// medium; bench_assign's contested instance (Zipf popularity: margins 0.009 medium epsilons), warm 2.4 s
// fine against 14.3 s medium and cold from its row sample's prices (9.9% excess) 2.6 s against 30 s.
template <typename T>
bool fine_start(const SubProblem<T>& P, const Candidates& C, const std::vector<double>& price, int64_t demand) {
  if (kNearExact * excess_demand(P, C) <= demand) return true;
  std::vector<double> margin;
  margin.reserve(P.rows.size());
  for (size_t r = 0; r < P.rows.size(); ++r) {
    const int64_t k = C.off[r] + P.c[r];
    if (P.c[r] == 0 || k >= C.off[r + 1]) continue;
    const int32_t a = C.expert[k - 1], b = C.expert[k];
    margin.push_back((P.score(r, a) - price[a]) - (P.score(r, b) - price[b]));
  }
  if (margin.empty()) return true;
  const auto mid = margin.begin() + margin.size() / 2;
  std::nth_element(margin.begin(), mid, margin.end());
  return kSwamped * *mid < std::ldexp(eps_scale(C), -kMediumBits);
}

// The auction on P from `price` (C: auction_lists at those prices), epsilon from scale * 2^-first_bits
// down to scale * 2^-last_bits (eps_scale), or with last_bits = 0 to half the certificate tolerance of P;
// at most bids_per_unit bids per unit of demand in a phase. A phase that stalls goes on at
// scale * 2^-medium_bits with kBidsPerUnit, keeping its holdings and prices (0: no going on). Null if it
// stalls for good; `eps` gets the last epsilon.
template <typename T>
std::unique_ptr<Transport<T>> run_auction(const SubProblem<T>& P, const std::vector<double>& price,
                                          const Candidates& C, int first_bits, int last_bits,
                                          int64_t bids_per_unit, int medium_bits, int extra, double& eps) {
  const int64_t R = static_cast<int64_t>(P.rows.size());
  const double range = C.range();
  double magnitude = std::max(std::abs(C.hi), std::abs(C.lo)) + range;
  for (double p : price) magnitude = std::max(magnitude, std::abs(p));
  // Bounds from select_candidates are computed in T: allow for their rounding.
  const double slack = 4.0 * std::numeric_limits<T>::epsilon() * magnitude;
  auto A = std::make_unique<Transport<T>>(P, C, price, extra, slack);
  // The tolerance of the exact solver (see extract) on this problem.
  const double tolerance = 1e-12 * (magnitude + (static_cast<double>(std::min<int64_t>(R, P.E)) + 2.0) * range);
  const double scale = eps_scale(C);
  const double last = std::max(last_bits > 0 ? std::ldexp(scale, -last_bits) : 0.5 * tolerance,
                               std::ldexp(magnitude, -kFloorBits));
  int64_t budget = bids_per_unit * (A->units() + R);
  int64_t rescan_cost = medium_bits > 0 ? std::max<int64_t>(1, P.E / 64) : 0;
  for (eps = std::ldexp(scale, -first_bits);; eps = std::max(last, std::ldexp(eps, -kStepBits))) {
    if (!A->phase(eps, budget, rescan_cost)) {
      if (medium_bits == 0) return nullptr;
      eps = std::max(eps, std::ldexp(scale, -medium_bits));
      budget = kBidsPerUnit * (A->units() + R);
      medium_bits = rescan_cost = 0;
      if (!A->phase(eps, budget, rescan_cost)) return nullptr;
    }
    if (eps <= last) break;
  }
  return A;
}

// The saturating auction on P, from the best start that works:
// 1. the caller's warm start (e.g. the previous round's prices) after one reverse step (reverse.hpp), at
//    fine or medium epsilon (see fine_start);
// 2. zero prices at fine epsilon, with a small bid budget, where few experts are contested (for a large
//    problem, only if that also worked on its row sample);
// 3. for a large problem, the prices of a row sample (solved the same way), likewise;
// 4. zero prices, coarse epsilon.
// Null if the case does not apply (sum c > sum u, or a client with fewer allowed experts than c_i) or
// every start stalls; C gets the lists of the start that worked. `zero_start` tells whether 2 did it.
template <typename T>
std::unique_ptr<Transport<T>> saturating_auction(const SubProblem<T>& P, const std::vector<double>& warm,
                                                 int last_bits, int extra, int threads, Candidates& C,
                                                 double& eps, bool& zero_start) {
  zero_start = false;
  int64_t demand = 0, supply = 0;
  for (int32_t c : P.c) demand += c;
  for (int32_t u : P.u) supply += u;
  if (demand > supply) return nullptr;
  // From estimated prices.
  const auto from = [&](const std::vector<double>& price) -> std::unique_ptr<Transport<T>> {
    if (!auction_lists(P, price, extra, threads, C)) return nullptr;
    if (fine_start(P, C, price, demand))
      return run_auction(P, price, C, kWarmBits, last_bits, kFineBidsPerUnit, kMediumBits, extra, eps);
    return run_auction(P, price, C, kMediumBits, last_bits, kBidsPerUnit, 0, extra, eps);
  };
  if (!warm.empty())
    if (auto A = from(lower_unclaimed(P, warm, threads))) return A;
  std::unique_ptr<Transport<T>> B;
  bool sample_zero = true;
  if (static_cast<int64_t>(P.rows.size()) >= kSampleMinRows) {
    const SubProblem<T> Q = row_sample(P);
    Candidates sample_lists;
    double sample_eps = 0.0;
    B = saturating_auction(Q, {}, kSampleBits, extra, threads, sample_lists, sample_eps, sample_zero);
  }
  // Lists at zero prices, selected at most once (for 2 and 4).
  const std::vector<double> zero(P.E, 0.0);
  Candidates zero_lists;
  int zero_state = -1;  // -1: not selected yet, else whether they apply
  const auto at_zero = [&]() {
    if (zero_state < 0) zero_state = auction_lists(P, zero, extra, threads, zero_lists);
    return zero_state == 1;
  };
  if (sample_zero || !B) {
    if (!at_zero()) return nullptr;
    if (2 * excess_demand(P, zero_lists) <= demand)  // few experts contested
      if (auto A = run_auction(P, zero, zero_lists, kFineBits, last_bits, kFineBidsPerUnit, 0, extra, eps)) {
        zero_start = true;
        C = std::move(zero_lists);
        return A;
      }
  }
  if (B)
    if (auto A = from(B->price())) return A;
  if (!at_zero()) return nullptr;
  auto A = run_auction(P, zero, zero_lists, kCoarseBits, last_bits, kBidsPerUnit, 0, extra, eps);
  if (A) C = std::move(zero_lists);
  return A;
}

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

// The certified solution of P (see the top of this file).
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

// Every row of the dense [N, E] `scores` as a problem, capacities clamped to [0, E] and [0, N].
template <typename T>
SubProblem<T> whole_problem(const py::array_t<T, py::array::c_style>& scores,
                            const py::array_t<int64_t, py::array::c_style>& c,
                            const py::array_t<int64_t, py::array::c_style>& u, int64_t dense_limit) {
  const int64_t N = scores.shape(0), E = scores.shape(1);
  SubProblem<T> P{scores.data(), E, dense_limit, std::vector<int64_t>(N), std::vector<int32_t>(N), std::vector<int32_t>(E)};
  std::iota(P.rows.begin(), P.rows.end(), 0);
  for (int64_t i = 0; i < N; ++i) P.c[i] = static_cast<int32_t>(std::clamp<int64_t>(c.data()[i], 0, E));
  for (int64_t j = 0; j < E; ++j) P.u[j] = static_cast<int32_t>(std::clamp<int64_t>(u.data()[j], 0, N));
  return P;
}

template <typename T>
py::dict solve_py(py::array_t<T, py::array::c_style> scores, py::array_t<int64_t, py::array::c_style> c,
                  py::array_t<int64_t, py::array::c_style> u, py::object warm, int extra, int threads,
                  int64_t dense_limit) {
  const int64_t N = scores.shape(0), E = scores.shape(1);
  const SubProblem<T> P = whole_problem(scores, c, u, dense_limit);
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
    throw std::invalid_argument("scores must be 2-D [N, E], client_capacity [N], expert_capacity and price [E]");
  const int64_t E = scores.shape(1);
  const SubProblem<T> P = whole_problem(scores, c, u, 0);
  const std::vector<double> lowered = lower_unclaimed(P, std::vector<double>(price.data(), price.data() + E),
                                                      std::max(1, threads));
  return py::array_t<double>(E, lowered.data());
}

}  // namespace
}  // namespace fedmoe

PYBIND11_MODULE(_assign, m) {
  m.doc() = "Exact capacity-constrained client-expert assignment (see fedmoe_kernels.assign).";
  m.def("solve", &fedmoe::solve_py<float>, py::arg("scores"), py::arg("client_capacity"),
        py::arg("expert_capacity"), py::arg("warm_prices"), py::arg("extra"), py::arg("threads"), py::arg("dense_limit"));
  m.def("solve", &fedmoe::solve_py<double>, py::arg("scores"), py::arg("client_capacity"),
        py::arg("expert_capacity"), py::arg("warm_prices"), py::arg("extra"), py::arg("threads"), py::arg("dense_limit"));
  m.def("select_rows", &fedmoe::select_rows_py<float>, py::arg("scores"), py::arg("price"), py::arg("L"));
  m.def("select_rows", &fedmoe::select_rows_py<double>, py::arg("scores"), py::arg("price"), py::arg("L"));
  m.def("lower_unclaimed", &fedmoe::lower_unclaimed_py<float>, py::arg("scores"), py::arg("client_capacity"),
        py::arg("expert_capacity"), py::arg("price"), py::arg("threads"));
  m.def("lower_unclaimed", &fedmoe::lower_unclaimed_py<double>, py::arg("scores"), py::arg("client_capacity"),
        py::arg("expert_capacity"), py::arg("price"), py::arg("threads"));
}
