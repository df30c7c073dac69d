// Forward auction over the full score matrix (Bertsekas), used for speed only: it moves the expert prices
// close to equilibrium and leaves every client a candidate list that holds its best experts at those
// prices. The exact answer comes afterwards from the flow solver and the certificate; nothing here needs
// to be exact, only fast.
//
// Clients bid for their missing experts; an expert holds its u_j highest bids and, once full, its price is
// the lowest bid it holds. A client's bid reads only its candidate list: the list's `bound` caps the
// reduced score of every expert outside it, and prices only rise, so the list answers exactly as long as
// its (needed+1)-th best value stays at or above the bound; otherwise the row is scanned again.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <vector>

#include "candidates.hpp"

namespace fedmoe {

template <typename T>
class Auction {
 public:
  // `C` holds lists selected with `price` (select_candidates, each row's capacity c_r + extra).
  Auction(const SubProblem<T>& P, std::vector<double>& price, const Candidates& C, int extra)
      : P_(P), price_(price), R_(static_cast<int64_t>(P.rows.size())), E_(P.E) {
    pr_.resize(E_);
    for (int64_t j = 0; j < E_; ++j) pr_[j] = static_cast<T>(price_[j]);
    list_off_.assign(R_ + 1, 0);
    hold_off_.assign(R_ + 1, 0);
    for (int64_t r = 0; r < R_; ++r) {
      list_off_[r + 1] = list_off_[r] + std::min<int64_t>(E_, P.c[r] + extra);
      hold_off_[r + 1] = hold_off_[r] + P.c[r];
    }
    list_.resize(list_off_[R_]);
    list_len_.resize(R_);
    for (int64_t r = 0; r < R_; ++r) {
      list_len_[r] = static_cast<int32_t>(C.off[r + 1] - C.off[r]);
      std::copy_n(C.expert.data() + C.off[r], list_len_[r], list_.data() + list_off_[r]);
    }
    bound_ = C.bound;
    allowed_ = C.allowed;
    hold_.resize(hold_off_[R_]);
    held_.assign(R_, 0);
    heap_off_.assign(E_ + 1, 0);
    for (int64_t j = 0; j < E_; ++j) heap_off_[j + 1] = heap_off_[j] + P.u[j];
    heap_bid_.resize(heap_off_[E_]);
    heap_client_.resize(heap_off_[E_]);
    heap_len_.assign(E_, 0);
    queued_.assign(R_, 0);
    range_ = C.range();
  }

  double range() const { return range_; }

  // Bid until every client holds its c_r experts (or has nothing left to bid for), at most max_bids bids.
  // Returns false if it stopped at max_bids.
  bool run(double eps, int64_t max_bids) {
    std::deque<int32_t> queue;
    for (int64_t r = 0; r < R_; ++r)
      if (P_.c[r] > 0 && allowed_[r] > 0) {
        queue.push_back(static_cast<int32_t>(r));
        queued_[r] = 1;
      }
    for (int64_t bids = 0; !queue.empty() && bids < max_bids; ++bids) {
      const int32_t r = queue.front();
      queue.pop_front();
      queued_[r] = 0;
      bid(r, eps, queue);
    }
    for (int32_t r : queue) queued_[r] = 0;
    return queue.empty();
  }

  // Final lists (each client's held experts included) into C; the holdings as CSR (off, expert).
  void finish(Candidates& C, std::vector<int64_t>& off, std::vector<int32_t>& expert) const {
    C.off.assign(R_ + 1, 0);
    C.expert.clear();
    off.assign(R_ + 1, 0);
    expert.clear();
    for (int64_t r = 0; r < R_; ++r) {
      const int32_t* l = list_.data() + list_off_[r];
      C.expert.insert(C.expert.end(), l, l + list_len_[r]);
      const int32_t* h = hold_.data() + hold_off_[r];
      for (int32_t k = 0; k < held_[r]; ++k)
        if (std::find(l, l + list_len_[r], h[k]) == l + list_len_[r]) C.expert.push_back(h[k]);
      C.off[r + 1] = static_cast<int64_t>(C.expert.size());
      expert.insert(expert.end(), h, h + held_[r]);
      std::sort(expert.end() - held_[r], expert.end());
      off[r + 1] = static_cast<int64_t>(expert.size());
    }
    C.bound = bound_;
  }

 private:
  bool holds(int64_t r, int32_t j) const {
    const int32_t* h = hold_.data() + hold_off_[r];
    return std::find(h, h + held_[r], j) != h + held_[r];
  }

  void rescan(int64_t r) {
    const RowTop<T> top = select_row(P_.row(r), pr_.data(), E_, list_off_[r + 1] - list_off_[r],
                                     list_.data() + list_off_[r], scratch_);
    list_len_[r] = static_cast<int32_t>(top.count);
    bound_[r] = top.bound;
  }

  void bid(int64_t r, double eps, std::deque<int32_t>& queue) {
    const int64_t need = P_.c[r] - held_[r];
    if (need <= 0) return;
    for (int attempt = 0;; ++attempt) {
      options_.clear();
      const int32_t* l = list_.data() + list_off_[r];
      for (int32_t k = 0; k < list_len_[r]; ++k) {
        const int32_t j = l[k];
        if (P_.u[j] > 0 && !holds(r, j)) options_.emplace_back(P_.score(r, j) - price_[j], j);
      }
      const int64_t keep = std::min<int64_t>(need + 1, static_cast<int64_t>(options_.size()));
      std::partial_sort(options_.begin(), options_.begin() + keep, options_.end(), Better());
      const bool exact = static_cast<int64_t>(options_.size()) > need ? options_[need].first >= bound_[r]
                                                                       : bound_[r] == -std::numeric_limits<double>::infinity();
      if (exact || attempt == 1) break;
      rescan(r);
    }
    if (options_.empty()) return;  // nothing left to bid for: this client stays short
    const int64_t take = std::min<int64_t>(need, static_cast<int64_t>(options_.size()));
    double second = take < static_cast<int64_t>(options_.size()) ? options_[take].first : -std::numeric_limits<double>::infinity();
    second = std::max({second, bound_[r], options_[0].first - range_});  // cap the raise of a short client
    for (int64_t k = 0; k < take; ++k) {
      const int32_t j = options_[k].second;
      submit(j, static_cast<int32_t>(r), price_[j] + (options_[k].first - second) + eps, queue);
    }
  }

  // Expert j takes bid b from client r, evicting its lowest bid when full.
  void submit(int32_t j, int32_t r, double b, std::deque<int32_t>& queue) {
    double* hb = heap_bid_.data() + heap_off_[j];
    int32_t* hc = heap_client_.data() + heap_off_[j];
    int64_t n = heap_len_[j];
    if (n == P_.u[j]) {  // replace the root (lowest bid) and sift down
      const int32_t k = hc[0];
      int32_t* h = hold_.data() + hold_off_[k];
      *std::find(h, h + held_[k], j) = h[held_[k] - 1];
      --held_[k];
      if (!queued_[k]) {
        queue.push_back(k);
        queued_[k] = 1;
      }
      sift_down(hb, hc, n, 0, b, r);
    } else {  // sift up
      int64_t i = n++;
      while (i > 0 && hb[(i - 1) / 2] > b) {
        hb[i] = hb[(i - 1) / 2], hc[i] = hc[(i - 1) / 2], i = (i - 1) / 2;
      }
      hb[i] = b, hc[i] = r;
      heap_len_[j] = static_cast<int32_t>(n);
    }
    hold_[hold_off_[r] + held_[r]++] = j;
    if (n == P_.u[j] && hb[0] > price_[j]) {
      price_[j] = hb[0];
      pr_[j] = static_cast<T>(hb[0]);
    }
  }

  const SubProblem<T>& P_;
  std::vector<double>& price_;
  std::vector<T> pr_;
  int64_t R_, E_;
  std::vector<int64_t> list_off_, hold_off_, heap_off_;
  std::vector<int32_t> list_, list_len_, hold_, held_, allowed_, heap_client_, heap_len_;
  std::vector<double> bound_, heap_bid_;
  std::vector<char> queued_;
  std::vector<std::pair<double, int32_t>> options_;
  RowScratch<T> scratch_;
  double range_;
};

}  // namespace fedmoe
