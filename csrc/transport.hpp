// Epsilon-scaling auction for the saturating case: every client can get its c_i experts. That is a
// balanced transportation problem once a dummy client takes the spare capacity D = sum u - sum c at score
// 0 (it may hold several places of one expert): then every place is held at the end, and a plain forward
// auction with epsilon scaling converges (no spare expert is left with a stale positive price, which is
// what breaks a forward auction on the unbalanced problem).
//
// Expert j has u_j places, each with its own price (a min-heap; the root is the price a new bid must
// beat, the expert's price p_j). Clients bid for their best missing experts on their candidate lists
// (Bertsekas' bid for similar persons: each of the k best at the (k+1)-th best value minus epsilon); the
// dummy bids for the cheapest place anywhere. Between phases epsilon shrinks and a holding is kept only if
// it is still within epsilon of the client's best alternative, so late phases rebid little.
//
// Candidate lists: `bound[r]` caps the reduced score of every allowed expert off row r's list, and prices
// only rise, so a list answers exactly while its (need+1)-th best value is at least the bound (plus the
// rounding allowance `slack` of bounds computed in T); otherwise the row is scanned again.
// At the end every holding is within epsilon of every alternative on the full row (epsilon-complementary
// slackness), so the caller's certificate needs no repair rounds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <vector>

#include "candidates.hpp"
#include "options.hpp"

namespace fedmoe {

template <typename T>
class Transport {
 public:
  // `C` from select_candidates (lists of c_r + extra) with prices `price` [E]; sum(c) <= sum(u) and every
  // client has at least c_r allowed experts (the caller checks both).
  Transport(const SubProblem<T>& P, const Candidates& C, const std::vector<double>& price, int extra,
            double slack)
      : P_(P), R_(static_cast<int64_t>(P.rows.size())), E_(P.E), price_(price), slack_(slack) {
    list_off_.assign(R_ + 1, 0);
    hold_off_.assign(R_ + 1, 0);
    for (int64_t r = 0; r < R_; ++r) {
      // room for the selected list, and for rescans that double it up to c_r + max(extra, longest_extra)
      const int64_t selected = C.off[r + 1] - C.off[r];
      const int64_t grown = P.c[r] + std::max(extra, kSolverOptions.longest_extra);
      list_off_[r + 1] = list_off_[r] + std::min<int64_t>(E_, std::max(selected, grown));
      hold_off_[r + 1] = hold_off_[r] + P.c[r];
    }
    list_.resize(list_off_[R_]);
    list_score_.resize(list_off_[R_]);
    list_len_.resize(R_);
    for (int64_t r = 0; r < R_; ++r) {
      list_len_[r] = static_cast<int32_t>(C.off[r + 1] - C.off[r]);
      std::copy_n(C.expert.data() + C.off[r], list_len_[r], list_.data() + list_off_[r]);
      for (int64_t k = list_off_[r]; k < list_off_[r] + list_len_[r]; ++k) list_score_[k] = P.score(r, list_[k]);
    }
    bound_ = C.bound;
    pr_.resize(E_);
    for (int64_t j = 0; j < E_; ++j) pr_[j] = static_cast<T>(price_[j]);
    hold_.resize(hold_off_[R_]);
    paid_.resize(hold_off_[R_]);
    hold_score_.resize(hold_off_[R_]);
    held_.assign(R_, 0);
    place_off_.assign(E_ + 1, 0);
    for (int64_t j = 0; j < E_; ++j) place_off_[j + 1] = place_off_[j] + P.u[j];
    place_price_.resize(place_off_[E_]);
    place_holder_.assign(place_off_[E_], kEmpty);
    for (int64_t j = 0; j < E_; ++j)
      std::fill(place_price_.begin() + place_off_[j], place_price_.begin() + place_off_[j + 1], price_[j]);
    int64_t demand = 0;
    for (int32_t c : P.c) demand += c;
    dummy_need_ = place_off_[E_] - demand;
    queued_.assign(R_ + 1, 0);
    marked_.assign(E_, 0);
    for (int64_t j = 0; j < E_; ++j)
      if (P.u[j] > 0) cheap_.push_back(static_cast<int32_t>(j));
    std::sort(cheap_.begin(), cheap_.end(), [&](int32_t x, int32_t y) { return price_[x] < price_[y]; });
    cheap_at_.assign(E_, -1);
    for (size_t k = 0; k < cheap_.size(); ++k) cheap_at_[cheap_[k]] = static_cast<int64_t>(k);
  }

  int64_t units() const { return place_off_[E_]; }

  // One phase at `eps`: drop holdings no longer within eps of the best alternative, then bid until every
  // place is held. False if that takes more than `max_bids` bids, a row rescan counting as `rescan_cost`
  // of them (0: free); the state stays consistent, and another phase may go on from it.
  bool phase(double eps, int64_t max_bids, int64_t rescan_cost) {
    std::deque<int32_t> queue;
    for (int64_t r = 0; r < R_; ++r) {
      if (P_.c[r] == 0) continue;
      release_stale(r, eps);
      if (held_[r] < P_.c[r]) push(queue, static_cast<int32_t>(r));
    }
    // The dummy keeps a place only if it is within eps of the cheapest place it does not hold.
    const double cheapest = cheapest_not_dummys();
    for (int64_t j = 0; j < E_; ++j)
      for (int64_t k = place_off_[j]; k < place_off_[j + 1]; ++k)
        if (place_holder_[k] == dummy() && place_price_[k] > cheapest + eps) {
          vacate(static_cast<int32_t>(j), dummy());
          ++dummy_need_;
          k = place_off_[j] - 1;  // vacate reorders the heap: look again
        }
    if (dummy_need_ > 0) push(queue, dummy());
    int64_t bids = 0;
    rescans_ = 0;
    for (; !queue.empty(); ++bids) {
      if (bids + rescan_cost * rescans_ >= max_bids) {
        for (int32_t q : queue) queued_[q] = 0;  // the next phase queues whoever is short again
        return false;
      }
      const int32_t r = queue.front();
      queue.pop_front();
      queued_[r] = 0;
      if (r == dummy()) {
        dummy_bid(eps, queue);
        if (dummy_need_ > 0) push(queue, dummy());
      } else {
        client_bid(r, eps, queue);
        if (stuck_) return false;
      }
    }
    level_dummy();
    return true;
  }

  const std::vector<double>& price() const { return price_; }

  // Holdings as CSR (off [R+1], expert ascending within a row), and each client's value
  // v_r = max(worst reduced score it holds, best one on its list it does not hold): with
  // the prices, a dual solution of the balanced problem (box duals cover holdings above v_r).
  void finish(std::vector<int64_t>& off, std::vector<int32_t>& expert, std::vector<double>& value) {
    off.assign(R_ + 1, 0);
    expert.clear();
    value.assign(R_, 0.0);
    for (int64_t r = 0; r < R_; ++r) {
      const int32_t* h = hold_.data() + hold_off_[r];
      expert.insert(expert.end(), h, h + held_[r]);
      std::sort(expert.end() - held_[r], expert.end());
      off[r + 1] = static_cast<int64_t>(expert.size());
      double worst = std::numeric_limits<double>::infinity();
      const double* hs = hold_score_.data() + hold_off_[r];
      for (int32_t k = 0; k < held_[r]; ++k) worst = std::min(worst, hs[k] - price_[h[k]]);
      // Off the list, the full-row certificate checks v_r.
      value[r] = held_[r] > 0 ? std::max(worst, best_on_list(r)) : 0.0;
    }
  }

 private:
  static constexpr int32_t kEmpty = -1;
  int32_t dummy() const { return static_cast<int32_t>(R_); }

  void push(std::deque<int32_t>& queue, int32_t r) {
    if (!queued_[r]) queued_[r] = 1, queue.push_back(r);
  }

  // Mark (1) or unmark (0) the experts r holds in `marked_`.
  void mark(int64_t r, char on) {
    const int32_t* h = hold_.data() + hold_off_[r];
    for (int32_t k = 0; k < held_[r]; ++k) marked_[h[k]] = on;
  }

  // Upper bound on the reduced score of any allowed expert off row r's list.
  double outside(int64_t r) const { return bound_[r] + slack_; }

  // The best reduced score of the experts on r's list that r does not hold.
  double best_on_list(int64_t r) {
    double best = -std::numeric_limits<double>::infinity();
    const int32_t* l = list_.data() + list_off_[r];
    const double* ls = list_score_.data() + list_off_[r];
    mark(r, 1);
    for (int32_t k = 0; k < list_len_[r]; ++k)
      if (P_.u[l[k]] > 0 && !marked_[l[k]]) best = std::max(best, ls[k] - price_[l[k]]);
    mark(r, 0);
    return best;
  }

  // Remove r's k-th holding from its lists (the last one takes its slot).
  void forget(int64_t r, int32_t k) {
    const int64_t at = hold_off_[r] + k, last = hold_off_[r] + held_[r] - 1;
    hold_[at] = hold_[last], paid_[at] = paid_[last], hold_score_[at] = hold_score_[last];
    --held_[r];
  }

  // Drop r's holdings that are more than eps below its best alternative (dropping one can raise it).
  void release_stale(int64_t r, double eps) {
    for (bool dropped = true; dropped && held_[r] > 0;) {
      dropped = false;
      const double best = std::max(best_on_list(r), outside(r));
      const int32_t* h = hold_.data() + hold_off_[r];
      const double* q = paid_.data() + hold_off_[r];
      const double* hs = hold_score_.data() + hold_off_[r];
      for (int32_t k = 0; k < held_[r];) {
        if (hs[k] - q[k] < best - eps) {
          vacate(h[k], static_cast<int32_t>(r));
          forget(r, k);
          dropped = true;
        } else {
          ++k;
        }
      }
    }
  }

  // The price of the cheapest place the dummy does not hold (+inf if it holds all).
  double cheapest_not_dummys() const {
    double cheapest = std::numeric_limits<double>::infinity();
    for (size_t k = 0; k < place_price_.size(); ++k)
      if (place_holder_[k] != dummy()) cheapest = std::min(cheapest, place_price_[k]);
    return cheapest;
  }

  // Raise the dummy's places to the cheapest place it does not hold (to the dearest place if it holds all).
  // That keeps everyone's epsilon-CS (prices only rise, and the dummy's places stay the cheapest) and
  // leaves the experts with spare places within epsilon of one price, so that per-expert duals (finish)
  // are tight.
  void level_dummy() {
    double floor = cheapest_not_dummys();
    if (floor == std::numeric_limits<double>::infinity())  // the dummy holds every place: level them all
      floor = place_price_.empty() ? 0.0 : *std::max_element(place_price_.begin(), place_price_.end());
    for (int64_t j = 0; j < E_; ++j) {
      double* q = place_price_.data() + place_off_[j];
      int32_t* h = place_holder_.data() + place_off_[j];
      const int64_t n = P_.u[j];
      bool changed = false;
      for (int64_t k = 0; k < n; ++k)
        if (h[k] == dummy() && q[k] < floor) q[k] = floor, changed = true;
      if (!changed) continue;
      for (int64_t i = n / 2 - 1; i >= 0; --i) sift_down(q, h, n, i, q[i], h[i]);
      price_[j] = q[0];
      pr_[j] = static_cast<T>(q[0]);
      raised(static_cast<int32_t>(j));
    }
  }

  // Empty r's place at expert j. The place drops to the expert's price and becomes the root: nobody's
  // alternatives change (they see j at that price already), and the next bid for j fills it.
  void vacate(int32_t j, int32_t r) {
    double* q = place_price_.data() + place_off_[j];
    int32_t* h = place_holder_.data() + place_off_[j];
    int64_t i = 0;
    while (h[i] != r) ++i;
    for (; i > 0; i = (i - 1) / 2) q[i] = q[(i - 1) / 2], h[i] = h[(i - 1) / 2];
    h[0] = kEmpty;  // q[0], the expert's price, is unchanged
  }

  // Scan row r again at the current prices (in T, like select_candidates), into a list twice as long as
  // before (up to its room): rows that go stale often are where prices are close.
  void rescan(int64_t r) {
    const int64_t room = list_off_[r + 1] - list_off_[r];
    const int64_t L = std::min(room, std::max<int64_t>(2 * list_len_[r], 1));
    const RowTop<T> top = select_row(P_.row(r), pr_.data(), E_, L, list_.data() + list_off_[r], scratch_);
    list_len_[r] = static_cast<int32_t>(top.count);
    const T* row = P_.row(r);
    for (int64_t k = list_off_[r]; k < list_off_[r] + top.count; ++k) list_score_[k] = static_cast<double>(row[list_[k]]);
    bound_[r] = top.bound;
  }

  void client_bid(int32_t r, double eps, std::deque<int32_t>& queue) {
    const int64_t need = P_.c[r] - held_[r];
    if (need <= 0) return;
    for (bool rescanned = false;; rescanned = true) {
      options_.clear();
      const int32_t* l = list_.data() + list_off_[r];
      const double* ls = list_score_.data() + list_off_[r];
      mark(r, 1);
      for (int32_t k = 0; k < list_len_[r]; ++k) {
        const int32_t j = l[k];
        if (P_.u[j] > 0 && !marked_[j]) options_.emplace_back(ls[k] - price_[j], k);
      }
      mark(r, 0);
      const int64_t keep = std::min<int64_t>(need + 1, static_cast<int64_t>(options_.size()));
      std::partial_sort(options_.begin(), options_.begin() + keep, options_.end(), Better());
      const double needed = static_cast<int64_t>(options_.size()) > need ? options_[need].first
                                                                          : -std::numeric_limits<double>::infinity();
      if (needed >= outside(r) || rescanned) break;
      rescan(r);
      ++rescans_;
    }
    if (static_cast<int64_t>(options_.size()) < need) {  // fewer allowed experts than c_r: not saturating
      stuck_ = true;
      return;
    }
    double second = std::max(static_cast<int64_t>(options_.size()) > need ? options_[need].first
                                                                           : -std::numeric_limits<double>::infinity(),
                             outside(r));
    // A client with no alternative at all (it can only ever hold these) raises by at most eps.
    if (second == -std::numeric_limits<double>::infinity()) second = options_[need - 1].first;
    for (int64_t k = 0; k < need; ++k) {
      const int64_t at = list_off_[r] + options_[k].second;
      const int32_t j = list_[at];
      place(j, r, price_[j] + std::max(0.0, options_[k].first - second) + eps, list_score_[at], queue);
    }
  }

  void dummy_bid(double eps, std::deque<int32_t>& queue) {
    const int32_t j = cheap_[0];
    const double* q = place_price_.data() + place_off_[j];
    const int64_t n = P_.u[j];
    double second = std::numeric_limits<double>::infinity();
    if (n > 1) second = q[1];
    if (n > 2) second = std::min(second, q[2]);
    for (size_t k = 1; k < std::min<size_t>(3, cheap_.size()); ++k) second = std::min(second, price_[cheap_[k]]);
    if (second == std::numeric_limits<double>::infinity()) second = price_[j];
    --dummy_need_;
    place(j, dummy(), second + eps, 0.0, queue);
  }

  // Expert j's price rose: move it down the min-heap `cheap_` of experts by price (the dummy's choice).
  void raised(int32_t j) {
    const int64_t n = static_cast<int64_t>(cheap_.size());
    int64_t i = cheap_at_[j];
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && price_[cheap_[c + 1]] < price_[cheap_[c]]) ++c;
      if (!(price_[cheap_[c]] < price_[j])) break;
      cheap_[i] = cheap_[c], cheap_at_[cheap_[i]] = i, i = c;
    }
    cheap_[i] = j, cheap_at_[j] = i;
  }

  // Expert j's cheapest place goes to bidder r at price b (> that place's price); its holder is evicted.
  void place(int32_t j, int32_t r, double b, double score, std::deque<int32_t>& queue) {
    double* q = place_price_.data() + place_off_[j];
    int32_t* h = place_holder_.data() + place_off_[j];
    const int64_t n = P_.u[j];
    const int32_t evicted = h[0];
    if (evicted == dummy()) {
      ++dummy_need_;
      push(queue, dummy());
    } else if (evicted != kEmpty) {
      const int32_t* eh = hold_.data() + hold_off_[evicted];
      forget(evicted, static_cast<int32_t>(std::find(eh, eh + held_[evicted], j) - eh));
      push(queue, evicted);
    }
    sift_down(q, h, n, 0, b, r);
    if (r != dummy()) {
      hold_[hold_off_[r] + held_[r]] = j;
      paid_[hold_off_[r] + held_[r]] = b;
      hold_score_[hold_off_[r] + held_[r]] = score;
      ++held_[r];
    }
    price_[j] = q[0];
    pr_[j] = static_cast<T>(q[0]);
    raised(j);
  }

  const SubProblem<T>& P_;
  int64_t R_, E_;
  std::vector<double> price_;
  double slack_;
  std::vector<int64_t> list_off_, hold_off_, place_off_;
  std::vector<int32_t> list_, list_len_, hold_, held_, place_holder_;
  std::vector<double> list_score_, bound_, paid_, hold_score_, place_price_;
  std::vector<T> pr_;
  std::vector<char> queued_, marked_;
  RowScratch<T> scratch_;
  int64_t dummy_need_ = 0;
  bool stuck_ = false;
  int64_t rescans_ = 0;  // in this phase
  std::vector<int32_t> cheap_;    // experts with places, a min-heap by price
  std::vector<int64_t> cheap_at_;  // position of each expert in cheap_
  std::vector<std::pair<double, int32_t>> options_;
};

}  // namespace fedmoe
