// Exact b-matching on a candidate graph by successive shortest paths (Dijkstra on reduced costs).
//
// Network: clients i (supply c_i), experts j, sink t (demand sum c). Arcs: i->j for every candidate
// (capacity 1, cost -S_ij); j->t (capacity u_j, cost 0); i->t, the "short" arc (capacity c_i, cost B)
// that lets a client stay short. B exceeds what any augmenting path can gain in score, so a min-cost flow
// has the most real pairs first and then the largest score: the lexicographic objective in one problem.
//
// The flow is a pseudo-flow whose residual arcs all have reduced cost c + pi(v) - pi(w) >= 0; nodes with
// excess send it along shortest paths to nodes with deficit until none is left. It starts from any
// holdings and expert prices (see start()), so nothing has to be exact going in; a repair round restarts
// the same way from the previous solution and duals on a larger graph.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <queue>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

namespace fedmoe {

class BMatching {
 public:
  // Candidates in CSR form (`off` [R+1], `expert`, `score` per arc); `c` [R], `u` [E].
  BMatching(std::vector<int64_t> off, std::vector<int32_t> expert, std::vector<double> score, std::vector<int32_t> c,
            std::vector<int32_t> u, double big)
      : R_(static_cast<int64_t>(c.size())), E_(static_cast<int64_t>(u.size())), off_(std::move(off)),
        expert_(std::move(expert)), score_(std::move(score)), c_(std::move(c)), u_(std::move(u)), big_(big) {
    const int64_t n = R_ + E_ + 1;
    used_.assign(expert_.size(), 0);
    client_of_.resize(expert_.size());
    for (int64_t r = 0; r < R_; ++r)
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a) client_of_[a] = static_cast<int32_t>(r);
    holders_.assign(E_, {});
    to_t_.assign(E_, 0);
    key_.assign(E_, 0.0);
    in_from_t_.assign(E_, 0);
    short_.assign(R_, 0);
    in_short_list_.assign(R_, 0);
    pi_.assign(n, 0.0);
    excess_.assign(n, 0);
    dist_.assign(n, 0.0);
    state_.assign(n, 0);
    pred_.assign(n, -1);
  }

  int64_t clients() const { return R_; }
  int64_t experts() const { return E_; }
  const std::vector<int64_t>& off() const { return off_; }
  const std::vector<int32_t>& expert() const { return expert_; }
  bool used(int64_t a) const { return used_[a] != 0; }
  int32_t short_units(int64_t r) const { return short_[r]; }
  double potential_client(int64_t r) const { return pi_[r]; }
  double potential_expert(int64_t j) const { return pi_[R_ + j]; }
  double potential_sink() const { return pi_[R_ + E_]; }
  double big() const { return big_; }

  // Start from expert prices p (>= 0) and preferred pairs per client (CSR over clients, may be empty).
  // A client's potential sits at its best candidate it does not prefer (reduced score S - p), or at its
  // worst preferred one if it prefers them all; it keeps the preferred pairs worth at least that, within
  // tolerance() (an auction run to that epsilon keeps them all). An expert the preferred pairs fill keeps
  // its price and owes the pairs its clients dropped (a deficit); any other expert starts at price 0,
  // where every optimum that leaves it spare puts it, and clients drop the pairs it now beats. solve()
  // then moves every dropped pair along shortest paths.
  void start(const std::vector<double>& price, const std::vector<int64_t>& pref_off, const std::vector<int32_t>& pref) {
    const int64_t t = R_ + E_;
    const double tol = tolerance();
    pi_[t] = 0.0;
    std::vector<char> want(E_, 0);
    std::vector<int32_t> load(E_, 0), held(E_, 0);
    for (int32_t j : pref) ++held[j];
    for (int64_t j = 0; j < E_; ++j) pi_[R_ + j] = held[j] >= u_[j] ? -price[j] : 0.0;
    for (int64_t r = 0; r < R_; ++r) {
      if (!pref_off.empty())
        for (int64_t k = pref_off[r]; k < pref_off[r + 1]; ++k) want[pref[k]] = 1;
      double best_other = -std::numeric_limits<double>::infinity();
      double worst_wanted = std::numeric_limits<double>::infinity();
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a) {
        if (want[expert_[a]])
          worst_wanted = std::min(worst_wanted, value(a));
        else
          best_other = std::max(best_other, value(a));
      }
      const bool prefers = worst_wanted < std::numeric_limits<double>::infinity();
      pi_[r] = best_other > -std::numeric_limits<double>::infinity() ? best_other : (prefers ? worst_wanted : 0.0);
      int32_t kept = 0;
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a) {
        const int32_t j = expert_[a];
        if (want[j] && kept < c_[r] && load[j] < u_[j] && value(a) >= pi_[r] - tol) {
          used_[a] = 1;
          ++kept, ++load[j];
          holders_[j].push_back(a);
        }
      }
      excess_[r] = c_[r] - kept;
      if (!pref_off.empty())
        for (int64_t q = pref_off[r]; q < pref_off[r + 1]; ++q) want[pref[q]] = 0;
    }
    int64_t into_t = 0, demand = 0;
    for (int64_t j = 0; j < E_; ++j) {
      if (held[j] >= u_[j] && price[j] > 0.0) {  // full in the preferred pairs: keep the price, owe the gap
        to_t_[j] = u_[j];
        excess_[R_ + j] = load[j] - u_[j];
      } else {
        to_t_[j] = load[j];
      }
      into_t += to_t_[j];
      sync(j);
    }
    for (int64_t r = 0; r < R_; ++r) demand += c_[r];
    excess_[t] = into_t - demand;
    saturate_violations();
  }

  // Rounding allowance on reduced costs (potentials reach the size of `big`).
  double tolerance() const { return 1e-13 * big_; }

  // Push one unit along every unused arc with reduced cost below -tolerance(): the client gets a deficit
  // and the expert an excess, and every residual arc is back at reduced cost >= 0.
  void saturate_violations() {
    for (int64_t r = 0; r < R_; ++r)
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a)
        if (!used_[a] && -score_[a] + pi_[r] - pi_[R_ + expert_[a]] < -tolerance()) {
          used_[a] = 1;
          holders_[expert_[a]].push_back(a);
          --excess_[r];
          ++excess_[R_ + expert_[a]];
        }
  }

  // Route every excess along shortest paths.
  void solve() {
    const int64_t n = R_ + E_ + 1;
    for (int64_t v = 0; v < n; ++v)
      while (excess_[v] > 0) augment_from(v);
  }

 private:
  using Item = std::pair<double, int32_t>;

  double value(int64_t a) const { return score_[a] + pi_[R_ + expert_[a]]; }  // S_ij - p_j

  // Keep expert j in from_t_ (keyed by -pi_j, so the sink's arcs t->j come in reduced-cost order) exactly
  // while it has flow to the sink.
  void sync(int64_t j) {
    if (in_from_t_[j]) from_t_.erase({key_[j], static_cast<int32_t>(j)});
    in_from_t_[j] = to_t_[j] > 0;
    if (in_from_t_[j]) from_t_.emplace(key_[j] = -pi_[R_ + j], static_cast<int32_t>(j));
  }

  void relax(int64_t w, double d, int64_t pred) {
    if (state_[w] == 2) return;
    if (state_[w] == 0 || d < dist_[w]) {
      if (state_[w] == 0) touched_.push_back(static_cast<int32_t>(w));
      state_[w] = 1;
      dist_[w] = d;
      pred_[w] = pred;
      heap_.emplace(d, static_cast<int32_t>(w));
    }
  }

  // One Dijkstra from `src` to the nearest node with deficit, then push along the path.
  void augment_from(int64_t src) {
    const int64_t t = R_ + E_;
    touched_.clear();
    settled_.clear();
    heap_ = {};
    relax(src, 0.0, -1);
    int64_t sink = -1;
    const int32_t cursor = static_cast<int32_t>(t + 1);  // heap entry: the next arc of from_t_
    std::set<std::pair<double, int32_t>>::const_iterator next;
    double t_dist = 0.0;
    while (!heap_.empty()) {
      const auto [d, v] = heap_.top();
      heap_.pop();
      if (v == cursor) {  // the sink's arcs, one at a time in reduced-cost order
        relax(R_ + next->second, d, -1);
        if (++next != from_t_.end()) heap_.emplace(t_dist + std::max(0.0, pi_[t] + next->first), cursor);
        continue;
      }
      if (state_[v] == 2 || d > dist_[v]) continue;
      state_[v] = 2;
      settled_.push_back(v);
      if (v != src && excess_[v] < 0) {
        sink = v;
        break;
      }
      if (v < R_) {  // client: unused candidates, and the short arc
        for (int64_t a = off_[v]; a < off_[v + 1]; ++a)
          if (!used_[a]) {
            const int64_t w = R_ + expert_[a];
            relax(w, d + std::max(0.0, -score_[a] + pi_[v] - pi_[w]), a);
          }
        if (short_[v] < c_[v]) relax(t, d + std::max(0.0, big_ + pi_[v] - pi_[t]), -2 - v);
      } else if (v < t) {  // expert: back to its holders, and on to the sink
        const int64_t j = v - R_;
        for (int64_t a : holders_[j]) {
          const int64_t w = client_of_[a];
          relax(w, d + std::max(0.0, score_[a] + pi_[v] - pi_[w]), a);
        }
        if (to_t_[j] < u_[j]) relax(t, d + std::max(0.0, pi_[v] - pi_[t]), -2 - (R_ + j));
      } else {  // sink: back along j->t flow (lazily, see `cursor`) and short arcs
        next = from_t_.begin();
        t_dist = d;
        if (next != from_t_.end()) heap_.emplace(d + std::max(0.0, pi_[t] + next->first), cursor);
        size_t keep = 0;  // compact the list to the clients still short
        for (int32_t r : short_list_) {
          if (short_[r] == 0) {
            in_short_list_[r] = 0;
            continue;
          }
          short_list_[keep++] = r;
          relax(r, d + std::max(0.0, -big_ + pi_[t] - pi_[r]), -1);
        }
        short_list_.resize(keep);
      }
    }
    if (sink < 0) throw std::logic_error("fedmoe assign: excess with no path to a deficit");
    // Potentials: pi += min(dist, dist[sink]) - dist[sink] keeps every reduced cost >= 0.
    const double ds = dist_[sink];
    for (int32_t v : settled_) {
      pi_[v] += dist_[v] - ds;
      if (v >= R_ && v < t) sync(v - R_);
    }
    for (int32_t v : touched_) state_[v] = 0;
    // Push along the predecessors, from the sink back to src: as much as the path, the excess at src and
    // the deficit at the sink allow (several units at once through j->t, t->j and short arcs).
    int64_t amount = std::min<int64_t>(excess_[src], -excess_[sink]);
    for (int64_t w = sink; w != src && amount > 1;) {
      const int64_t p = pred_[w];
      if (w < R_) {
        amount = p >= 0 ? 1 : std::min<int64_t>(amount, short_[w]);
        w = p >= 0 ? R_ + expert_[p] : t;
      } else if (w < t) {
        amount = p >= 0 ? 1 : std::min<int64_t>(amount, to_t_[w - R_]);
        w = p >= 0 ? client_of_[p] : t;
      } else {
        const int64_t v = -2 - p;
        amount = std::min<int64_t>(amount, v < R_ ? c_[v] - short_[v] : u_[v - R_] - to_t_[v - R_]);
        w = v;
      }
    }
    for (int64_t w = sink; w != src;) {
      const int64_t p = pred_[w];
      if (w < R_) {  // reached a client: from its expert (drop the pair) or from the sink (less short)
        if (p >= 0) {
          const int32_t j = expert_[p];
          used_[p] = 0;
          auto& h = holders_[j];
          *std::find(h.begin(), h.end(), p) = h.back();
          h.pop_back();
          w = R_ + j;
        } else {
          short_[w] -= static_cast<int32_t>(amount);
          w = t;
        }
      } else if (w < t) {  // reached an expert: from a client (new pair) or from the sink (less to t)
        if (p >= 0) {
          used_[p] = 1;
          holders_[w - R_].push_back(p);
          w = client_of_[p];
        } else {
          to_t_[w - R_] -= static_cast<int32_t>(amount);
          sync(w - R_);
          w = t;
        }
      } else {  // reached the sink: along j->t or a short arc
        const int64_t v = -2 - p;
        if (v < R_) {
          if (!in_short_list_[v]) {
            in_short_list_[v] = 1;
            short_list_.push_back(static_cast<int32_t>(v));
          }
          short_[v] += static_cast<int32_t>(amount);
        } else {
          to_t_[v - R_] += static_cast<int32_t>(amount);
          sync(v - R_);
        }
        w = v;
      }
    }
    excess_[src] -= amount;
    excess_[sink] += amount;
  }

  int64_t R_, E_;
  std::vector<int64_t> off_;
  std::vector<int32_t> expert_, client_of_, c_, u_, to_t_, short_, short_list_;
  std::vector<double> score_;
  std::vector<char> used_;
  std::vector<std::vector<int64_t>> holders_;
  double big_;
  std::vector<double> pi_, dist_;
  std::vector<int64_t> excess_, pred_;
  std::vector<char> state_;
  std::vector<int32_t> touched_, settled_;
  std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap_;
  std::set<std::pair<double, int32_t>> from_t_;
  std::vector<double> key_;
  std::vector<char> in_from_t_, in_short_list_;
};

}  // namespace fedmoe
