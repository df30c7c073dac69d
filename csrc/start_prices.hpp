// Where the auctions start, and how they run: the start prices (zero, the caller's warm start after a
// reverse step, or the prices of a row sample of the problem, solved the same way) for the saturating
// auction (saturating_auction) and for the forward auction of the general case (start_candidates).
//
// An auction runs one phase from the warm (or sampled, or zero) prices in the general case: epsilon
// scaling would restart the holdings and leave overpriced experts with spare capacity, which costs the
// exact solver more than it saves. The saturating auction scales epsilon (run_auction): from
// scale * 2^-first down by 2^-step_bits per phase to scale * 2^-last (never below 2^-floor_bits of the
// scores' magnitude: smaller raises would vanish in rounding), scale being eps_scale. A row sample's
// auction stops at sample_bits; a certified solve at half the certificate's tolerance. From zero prices
// it runs at fine 2^-fine_bits or coarse 2^-coarse_bits; from a sample's or the caller's prices at fine
// 2^-warm_bits, going on at medium 2^-medium_bits where that stalls, or medium right away (fine_start).
// The tuning constants are the fields of SolverOptions (options.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "auction.hpp"
#include "candidates.hpp"
#include "certificate.hpp"
#include "options.hpp"
#include "reverse.hpp"
#include "ssp.hpp"
#include "transport.hpp"

namespace fedmoe {

// ---------------------------------------------------------------- general case: the forward auction

// Candidate lists for P from an auction started at `price` (updated in place); the auction's holdings
// go to `holdings` (they seed the exact solver). With `budget` >= 0 the auction gives up after that many
// bids per unit of demand and returns no lists (an empty `off`). A `fine` auction ends within the exact
// solver's tolerance (cheap where few experts are contested); a coarse one (epsilon = range *
// 2^-contested_eps_bits) converges where many are, at the price of more work for the exact solver.
template <typename T>
Candidates auction_candidates(const SubProblem<T>& P, std::vector<double>& price, int extra, int threads,
                              Solution& holdings, int budget, bool fine) {
  Candidates C = select_candidates(P, price, extra, false, threads);
  Auction<T> A(P, price, C, extra);
  int64_t demand = 0;
  for (int32_t c : P.c) demand += c;
  const int64_t units = demand + static_cast<int64_t>(P.rows.size());
  // Epsilon 0 means within the exact solver's rounding tolerance (1e-13 of its `big`), so that its start
  // keeps every pair the auction holds; else range * 2^-contested_eps_bits.
  const double eps = fine ? 1e-13 * static_cast<double>(std::min<int64_t>(P.rows.size(), P.E) + 2) * A.range()
                          : std::ldexp(A.range(), -kSolverOptions.contested_eps_bits);
  if (!A.run(eps, budget >= 0 ? budget * units : kSolverOptions.max_bids_per_unit * units) &&
      budget >= 0)
    return Candidates{};
  A.finish(C, holdings.off, holdings.expert);
  return C;
}

template <typename T>
std::vector<double> price_estimate(const SubProblem<T>& P, int extra, int threads);

// A row sample of P (1 in sample_stride) with proportionally scaled expert capacities.
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
    if (h % kSolverOptions.sample_stride == 0) {
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
  Candidates C = auction_candidates(P, price, extra, threads, holdings, kSolverOptions.cold_bids_per_unit, true);
  if (!C.off.empty()) return C;
  price = fallback.empty() ? sample_prices(P, extra, threads) : std::move(fallback);
  return auction_candidates(P, price, extra, threads, holdings, -1, false);
}

// Expert prices of P without a certificate: exact duals when P is small, else auction prices.
template <typename T>
std::vector<double> price_estimate(const SubProblem<T>& P, int extra, int threads) {
  std::vector<double> price(P.E, 0.0);
  if (static_cast<int64_t>(P.rows.size()) * P.E <= std::max(P.dense_limit, kSolverOptions.sample_base_entries)) {
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

// ---------------------------------------------------------------- saturating case: the transport auction

// Candidate lists C of P for the auction, selected at `price`; false if some client has fewer allowed
// experts than c_i (the saturating case does not apply) or no pair is allowed.
template <typename T>
bool auction_lists(const SubProblem<T>& P, const std::vector<double>& price, int extra, int threads, Candidates& C) {
  C = select_candidates(P, price, kSolverOptions.list_factor * extra, false, threads);
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
// range, which they can widen several times over.
inline double eps_scale(const Candidates& C) { return C.spread > 0 ? C.spread : C.range(); }

// Whether an auction from `price` (C: auction_lists at those prices) should open at fine epsilon, not medium:
// when they nearly clear (at most 1 / near_exact of the demand lands beyond the expert capacities), or when
// a medium epsilon would swamp the clients' preferences (the median row's margin between its c_i-th and
// next listed reduced score is below 1 / swamped of it: clients then trade places at every raise).
// Prices after the reverse step typically leave a few percent of the demand in excess with margins of a
// fraction of a medium epsilon: a fine phase stalls there, medium converges. Nearly exact prices, or
// margins far below a medium epsilon (a few very popular experts), converge faster at fine epsilon.
template <typename T>
bool fine_start(const SubProblem<T>& P, const Candidates& C, const std::vector<double>& price, int64_t demand) {
  if (kSolverOptions.near_exact * excess_demand(P, C) <= demand) return true;
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
  return kSolverOptions.swamped * *mid < std::ldexp(eps_scale(C), -kSolverOptions.medium_bits);
}

// The auction on P from `price` (C: auction_lists at those prices), epsilon from scale * 2^-first_bits
// down to scale * 2^-last_bits (eps_scale), or with last_bits = 0 to half the certificate tolerance of P;
// at most bids_per_unit bids per unit of demand in a phase. A phase that stalls goes on at
// scale * 2^-medium_bits with bids_per_unit, keeping its holdings and prices (0: no going on). Null if it
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
                               std::ldexp(magnitude, -kSolverOptions.floor_bits));
  int64_t budget = bids_per_unit * (A->units() + R);
  int64_t rescan_cost = medium_bits > 0 ? std::max<int64_t>(1, P.E / kSolverOptions.rescan_bids_divisor) : 0;
  for (eps = std::ldexp(scale, -first_bits);; eps = std::max(last, std::ldexp(eps, -kSolverOptions.step_bits))) {
    if (!A->phase(eps, budget, rescan_cost)) {
      if (medium_bits == 0) return nullptr;
      eps = std::max(eps, std::ldexp(scale, -medium_bits));
      budget = kSolverOptions.bids_per_unit * (A->units() + R);
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
      return run_auction(P, price, C, kSolverOptions.warm_bits, last_bits, kSolverOptions.fine_bids_per_unit, kSolverOptions.medium_bits, extra, eps);
    return run_auction(P, price, C, kSolverOptions.medium_bits, last_bits, kSolverOptions.bids_per_unit, 0, extra, eps);
  };
  if (!warm.empty())
    if (auto A = from(lower_unclaimed(P, warm, threads))) return A;
  std::unique_ptr<Transport<T>> B;
  bool sample_zero = true;
  if (static_cast<int64_t>(P.rows.size()) >= kSolverOptions.sample_min_rows) {
    const SubProblem<T> Q = row_sample(P);
    Candidates sample_lists;
    double sample_eps = 0.0;
    B = saturating_auction(Q, {}, kSolverOptions.sample_bits, extra, threads, sample_lists, sample_eps, sample_zero);
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
      if (auto A = run_auction(P, zero, zero_lists, kSolverOptions.fine_bits, last_bits, kSolverOptions.fine_bids_per_unit, 0, extra, eps)) {
        zero_start = true;
        C = std::move(zero_lists);
        return A;
      }
  }
  if (B)
    if (auto A = from(B->price())) return A;
  if (!at_zero()) return nullptr;
  auto A = run_auction(P, zero, zero_lists, kSolverOptions.coarse_bits, last_bits, kSolverOptions.bids_per_unit, 0, extra, eps);
  if (A) C = std::move(zero_lists);
  return A;
}

}  // namespace fedmoe
