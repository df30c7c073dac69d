// One reverse-auction step on warm prices (e.g. the previous round's duals on this round's scores).
//
// A forward auction only raises prices. From a warm start it is cheap where prices are too low (a bid
// jumps a price by the bidder's whole margin) and slow where they are too high: nobody bids for an
// overpriced expert, so its places fill only once every competing price has climbed to it, in steps of
// epsilon. This step lowers those prices first, in one pass over the scores, the way a reverse auction
// does (experts bid for clients):
//
// * at the warm prices p each client r claims its c_r best experts; v_r is the reduced score S_rj - p_j of
//   the c_r-th of them;
// * an expert j above the lowest price theta that is claimed d_j < u_j times lowers its price by the
//   (u_j - d_j)-th smallest gap v_r - (S_rj - p_j) over the clients that do not claim it (the drop at which
//   that many would rather have j than their c_r-th claim), but not below theta. With fewer such clients
//   it drops to theta.
//
// All experts move at once (a Jacobi step), so some end too low; the forward auction corrects that
// cheaply. Theta stays the floor because the experts at the lowest price are where the spare capacity
// goes (the dummy client of transport.hpp). The step costs one pass over the scores, O(N E / threads)
// plus heap work O(N E log u) at worst, and saves the forward auction most of its slow climbs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "candidates.hpp"

namespace fedmoe {

// The warm prices `price` [E] of P with the underfilled experts lowered as described above.
template <typename T>
std::vector<double> lower_unclaimed(const SubProblem<T>& P, std::vector<double> price, int threads) {
  const int64_t R = static_cast<int64_t>(P.rows.size()), E = P.E;
  constexpr T kInfT = std::numeric_limits<T>::infinity();
  const double theta = P.lowest_price(price);
  if (R == 0 || theta == std::numeric_limits<double>::infinity()) return price;
  std::vector<T> pr(E);
  for (int64_t j = 0; j < E; ++j) pr[j] = static_cast<T>(price[j]);
  // Each expert keeps its u_j smallest gaps in a max-heap (per thread): u_j - d_j <= u_j are ever needed.
  std::vector<int64_t> heap_off(E + 1, 0);
  for (int64_t j = 0; j < E; ++j) heap_off[j + 1] = heap_off[j] + (price[j] > theta ? P.u[j] : 0);
  const int nt = std::max(1, threads);
  struct Part {
    std::vector<int64_t> claimed;
    std::vector<double> gap;
    std::vector<int32_t> size;
    std::vector<T> cut;  // a gap at or above it cannot enter j's heap (+inf until the heap is full)
  };
  std::vector<Part> parts(nt);
  parallel_rows(R, threads, [&](int t, int64_t a, int64_t b) {
    Part& part = parts[t];
    part.claimed.assign(E, 0);
    part.gap.resize(heap_off[E]);
    part.size.assign(E, 0);
    part.cut.resize(E);
    for (int64_t j = 0; j < E; ++j) part.cut[j] = heap_off[j + 1] > heap_off[j] ? kInfT : -kInfT;
    std::vector<int32_t> ids(E);
    std::vector<char> mine(E, 0);
    RowScratch<T> scratch;
    for (int64_t r = a; r < b; ++r) {
      if (P.c[r] == 0) continue;
      const T* row = P.row(r);
      const RowTop<T> top = select_row(row, pr.data(), E, P.c[r], ids.data(), scratch);
      if (top.count == 0) continue;
      const int32_t last = ids[top.count - 1];
      const T v = row[last] - pr[last];
      const double claim = static_cast<double>(row[last]) - price[last];  // v in double, for the gaps
      for (int64_t k = 0; k < top.count; ++k) ++part.claimed[ids[k]], mine[ids[k]] = 1;
      // 16-wide blocks: a branch-free test of gap < cut (written so that a forbidden entry, -inf, fails
      // even while the cut is +inf), then the hits one by one.
      for (int64_t j0 = 0; j0 < E; j0 += 16) {
        const int64_t jn = std::min(E, j0 + 16);
        uint32_t hits = 0;
        for (int64_t j = j0; j < jn; ++j)
          hits |= static_cast<uint32_t>(row[j] - pr[j] + part.cut[j] > v) << (j - j0);
        for (; hits != 0; hits &= hits - 1) {
          const int64_t j = j0 + __builtin_ctz(hits);
          if (mine[j]) continue;
          const double gap = claim - (static_cast<double>(row[j]) - price[j]);
          double* h = part.gap.data() + heap_off[j];
          int32_t& n = part.size[j];
          const int32_t cap = static_cast<int32_t>(heap_off[j + 1] - heap_off[j]);
          if (n < cap) {
            h[n++] = gap;
            std::push_heap(h, h + n);
          } else if (gap < h[0]) {
            std::pop_heap(h, h + n);
            h[n - 1] = gap;
            std::push_heap(h, h + n);
          }
          if (n == cap) part.cut[j] = static_cast<T>(h[0]);
        }
      }
      for (int64_t k = 0; k < top.count; ++k) mine[ids[k]] = 0;
    }
  });
  std::vector<double> gaps;
  for (int64_t j = 0; j < E; ++j) {
    if (heap_off[j + 1] == heap_off[j]) continue;
    int64_t claimed = 0;
    gaps.clear();
    for (const Part& part : parts) {
      if (part.claimed.empty()) continue;  // a thread without rows
      claimed += part.claimed[j];
      gaps.insert(gaps.end(), part.gap.begin() + heap_off[j], part.gap.begin() + heap_off[j] + part.size[j]);
    }
    const int64_t lack = P.u[j] - claimed;
    if (lack <= 0) continue;
    double drop = std::numeric_limits<double>::infinity();
    if (static_cast<int64_t>(gaps.size()) >= lack) {
      std::nth_element(gaps.begin(), gaps.begin() + (lack - 1), gaps.end());
      drop = gaps[lack - 1];
    }
    price[j] = std::max(theta, price[j] - drop);
  }
  return price;
}

}  // namespace fedmoe
