// The problem as the solver sees it, and per-client candidate lists chosen from the dense score matrix.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "options.hpp"

namespace fedmoe {

// Run body(thread, lo, hi) over [0, rows) split into contiguous blocks, one per thread.
template <class F>
void parallel_rows(int64_t rows, int threads, F&& body) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 256)));
  if (threads == 1) {
    body(0, int64_t{0}, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t step = (rows + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = std::min(rows, t * step), hi = std::min(rows, lo + step);
    pool.emplace_back([&body, t, lo, hi] { body(t, lo, hi); });
  }
  for (auto& th : pool) th.join();
}

// Rows (a subset) of the row-major score matrix S [*, E] with their capacities; experts are shared.
template <typename T>
struct SubProblem {
  const T* S;
  int64_t E;
  int64_t dense_limit;        // at most this many entries: every allowed pair is a candidate
  std::vector<int64_t> rows;  // row indices into S
  std::vector<int32_t> c;     // per row, clamped to E
  std::vector<int32_t> u;     // per expert, clamped to the number of rows
  const T* row(int64_t r) const { return S + rows[r] * E; }
  double score(int64_t r, int64_t j) const { return static_cast<double>(S[rows[r] * E + j]); }
  // The lowest of `price` [E] over experts with capacity (+inf if none has any).
  double lowest_price(const std::vector<double>& price) const {
    double theta = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < E; ++j)
      if (u[j] > 0) theta = std::min(theta, price[j]);
    return theta;
  }
};

// Candidate experts per row in CSR form. `bound[r]` is an upper bound on the reduced score S_rj - p_j of
// every allowed expert not in row r's list, for the prices it was selected with or any higher prices.
struct Candidates {
  std::vector<int64_t> off;
  std::vector<int32_t> expert;
  std::vector<int32_t> allowed;  // number of allowed (finite) pairs per row
  std::vector<double> bound;
  double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
  double spread = 0.0;  // the largest max - min of a row's finite scores (offsets per row do not count)
  double range() const { return hi > lo ? hi - lo : 1.0; }  // of the finite scores (1 if all equal or none)
};

// The best `L` experts of one row by reduced score row[j] - price[j] (ties: lower j first), written to
// ids[0..count); returns {count, bound} with bound the (L+1)-th best value (-inf if none). Also reports
// whether the row holds NaN or +inf, the number of finite entries and their min and max.
template <typename T>
struct RowTop {
  int64_t count = 0, finite = 0;
  T bound = -std::numeric_limits<T>::infinity();
  T lo = std::numeric_limits<T>::infinity(), hi = -std::numeric_limits<T>::infinity();
  bool bad = false;
};

// Order of (value, expert) pairs: higher value first, then lower expert index (a strict total order, so
// partial sorts and selections are deterministic).
struct Better {
  template <class Pair>
  bool operator()(const Pair& x, const Pair& y) const {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  }
};

// Put (b, holder) at position i of the min-heap (q, h) of n bids, moving it down to where it belongs (the
// experts' places in transport.hpp and auction.hpp: bid or price, and who holds it).
inline void sift_down(double* q, int32_t* h, int64_t n, int64_t i, double b, int32_t holder) {
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && q[c + 1] < q[c]) ++c;
    if (!(q[c] < b)) break;
    q[i] = q[c], h[i] = h[c], i = c;
  }
  q[i] = b, h[i] = holder;
}

// Per-thread scratch space of select_row.
template <typename T>
struct RowScratch {
  std::vector<T> vals;  // block maxima, then the best M of them
  std::vector<std::pair<T, int32_t>> all;
};

template <typename T>
RowTop<T> select_row(const T* row, const T* price, int64_t E, int64_t L, int32_t* ids, RowScratch<T>& scratch) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  RowTop<T> out;
  // Top M = L+1 in two passes over 16-wide blocks. The first validates and keeps each block's best reduced
  // score; the M-th best of those is a threshold no better than the M-th best entry (M blocks reach it).
  // The second collects the entries at or above it from the blocks that reach it (every finite entry when
  // fewer than M blocks hold one, as on rows not much longer than L).
  constexpr int64_t B = 16;
  const int64_t M = L + 1, nb = (E + B - 1) / B;
  scratch.vals.resize(2 * nb);
  T* block_best = scratch.vals.data();
  int64_t reached = 0;  // blocks with a finite entry
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * B, jn = std::min(E, j0 + B);
    T best = -kInf, lo = kInf, hi = -kInf;
    int64_t fin = 0;
    bool bad = false;
    for (int64_t j = j0; j < jn; ++j) {
      const T x = row[j];
      bad |= !(x < kInf);
      const bool ok = x > -kInf;
      fin += ok;
      lo = std::min(lo, ok ? x : kInf);
      hi = std::max(hi, x);
      best = std::max(best, x - price[j]);
    }
    out.bad |= bad;
    out.finite += fin;
    out.lo = std::min(out.lo, lo), out.hi = std::max(out.hi, hi);
    block_best[b] = fin > 0 ? best : -kInf;
    reached += fin > 0;
  }
  T thr = -kInf;
  if (reached >= M) {
    T* top = block_best + nb;
    if (M <= kSolverOptions.insert_top) {  // the M best kept sorted: most block maxima fail one comparison
      int64_t n = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const T x = block_best[b];
        if (n == M && !(x > top[M - 1])) continue;
        int64_t i = n < M ? n++ : M - 1;
        for (; i > 0 && top[i - 1] < x; --i) top[i] = top[i - 1];
        top[i] = x;
      }
    } else {
      std::copy_n(block_best, nb, top);
      std::nth_element(top, top + (M - 1), top + nb, std::greater<T>());
    }
    thr = top[M - 1];
  }
  auto& all = scratch.all;
  all.clear();
  for (int64_t b = 0; b < nb; ++b) {
    if (!(block_best[b] > -kInf) || block_best[b] < thr) continue;
    for (int64_t j = b * B, jn = std::min(E, j + B); j < jn; ++j) {
      const T x = row[j];
      const T v = x - price[j];
      if (x > -kInf && v >= thr) all.emplace_back(v, static_cast<int32_t>(j));
    }
  }
  constexpr Better better{};
  const int64_t keep = std::min<int64_t>(M, static_cast<int64_t>(all.size()));
  if (keep > 0) std::nth_element(all.begin(), all.begin() + (keep - 1), all.end(), better);
  std::sort(all.begin(), all.begin() + keep, better);
  out.count = std::min(keep, L);
  for (int64_t k = 0; k < out.count; ++k) ids[k] = all[k].second;
  if (keep == M) out.bound = all[L].first;
  return out;
}

// Candidate lists for every row of P: the best c_r + extra experts by reduced score (every allowed expert
// when `dense`). Throws std::invalid_argument if the rows hold NaN or +inf.
template <typename T>
Candidates select_candidates(const SubProblem<T>& P, const std::vector<double>& price, int extra, bool dense,
                             int threads) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  std::vector<T> pr(E);
  for (int64_t j = 0; j < E; ++j) pr[j] = static_cast<T>(price[j]);
  std::vector<int64_t> cap_off(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) cap_off[r + 1] = cap_off[r] + (dense ? E : std::min<int64_t>(E, P.c[r] + extra));
  std::vector<int32_t> slot(cap_off[R]), count(R, 0);
  Candidates C;
  C.allowed.assign(R, 0);
  C.bound.assign(R, -std::numeric_limits<double>::infinity());
  const int nt = std::max(1, threads);
  std::vector<char> bad(nt, 0);
  std::vector<double> lo(nt, C.lo), hi(nt, C.hi), spread(nt, 0.0);
  parallel_rows(R, threads, [&](int t, int64_t a, int64_t b) {
    RowScratch<T> scratch;
    for (int64_t r = a; r < b; ++r) {
      const RowTop<T> top = select_row(P.row(r), pr.data(), E, cap_off[r + 1] - cap_off[r], slot.data() + cap_off[r], scratch);
      bad[t] |= top.bad;
      lo[t] = std::min<double>(lo[t], top.lo), hi[t] = std::max<double>(hi[t], top.hi);
      if (top.finite > 0) spread[t] = std::max(spread[t], static_cast<double>(top.hi) - top.lo);
      count[r] = static_cast<int32_t>(top.count);
      C.allowed[r] = static_cast<int32_t>(top.finite);
      C.bound[r] = top.bound;
    }
  });
  for (int t = 0; t < nt; ++t) {
    if (bad[t]) throw std::invalid_argument("scores must not contain NaN or +inf");
    C.lo = std::min(C.lo, lo[t]), C.hi = std::max(C.hi, hi[t]), C.spread = std::max(C.spread, spread[t]);
  }
  C.off.assign(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) C.off[r + 1] = C.off[r] + count[r];
  C.expert.resize(C.off[R]);
  for (int64_t r = 0; r < R; ++r) std::copy_n(slot.data() + cap_off[r], count[r], C.expert.data() + C.off[r]);
  return C;
}

// Add pairs (row, expert), sorted by row, to the candidate lists, skipping those already there; new pairs
// go to the end of a row. Returns how many were added.
inline int64_t add_candidates(Candidates& C, const std::vector<std::pair<int64_t, int32_t>>& pairs) {
  const int64_t R = static_cast<int64_t>(C.off.size()) - 1;
  std::vector<int64_t> off(R + 1, 0);
  std::vector<int32_t> expert;
  expert.reserve(C.expert.size() + pairs.size());
  size_t k = 0;
  for (int64_t r = 0; r < R; ++r) {
    const auto b = C.expert.begin() + C.off[r], e = C.expert.begin() + C.off[r + 1];
    expert.insert(expert.end(), b, e);
    for (; k < pairs.size() && pairs[k].first == r; ++k)
      if (std::find(b, e, pairs[k].second) == e) expert.push_back(pairs[k].second);
    off[r + 1] = static_cast<int64_t>(expert.size());
  }
  const int64_t added = static_cast<int64_t>(expert.size() - C.expert.size());
  C.off = std::move(off);
  C.expert = std::move(expert);
  return added;
}

}  // namespace fedmoe
