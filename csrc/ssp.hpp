// Exact b-matching on a candidate graph by successive shortest paths (Dijkstra on reduced costs).
//
// Network: clients i (supply c_i), experts j, sink t (demand sum c). Arcs: i->j for every candidate
// (capacity 1, cost -S_ij); j->t (capacity u_j, cost 0); i->t, the "short" arc (capacity c_i, cost B)
// that lets a client stay short. B exceeds what any augmenting path can gain in score, so a min-cost flow
// has the most real pairs first and then the largest score: the lexicographic objective in one problem.
//
// The flow is a pseudo-flow whose residual arcs all have reduced cost c + pi(v) - pi(w) >= 0; nodes with
// excess send it along shortest paths to nodes with deficit until none is left. It starts from any
// holdings and expert prices: pairs that break optimality are dropped first, and an expert that has spare
// capacity at a positive price sends its j->t arc full (a deficit at j), so nothing has to be exact going
// in. New arcs (repair) with negative reduced cost are saturated, and the same loop restores optimality.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <queue>
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
    short_.assign(R_, 0);
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
  // A client keeps the preferred pairs that lead its candidates sorted by reduced score S - p (so none of
  // them is worth less than a pair it does not hold); its potential sits at the first one it does not keep.
  // An expert left with spare capacity drops its price to 0 (where every optimum that leaves it spare puts
  // it); the arcs this makes attractive are saturated and rerouted by solve().
  void start(const std::vector<double>& price, const std::vector<int64_t>& pref_off, const std::vector<int32_t>& pref) {
    const int64_t t = R_ + E_;
    pi_[t] = 0.0;
    for (int64_t j = 0; j < E_; ++j) pi_[R_ + j] = -price[j];
    std::vector<char> want(E_, 0);
    std::vector<int32_t> load(E_, 0);
    std::vector<std::pair<double, int64_t>> order;
    for (int64_t r = 0; r < R_; ++r) {
      if (!pref_off.empty())
        for (int64_t k = pref_off[r]; k < pref_off[r + 1]; ++k) want[pref[k]] = 1;
      order.clear();
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a) order.emplace_back(-value(a), a);
      std::sort(order.begin(), order.end());
      int32_t kept = 0;
      size_t k = 0;
      for (; k < order.size(); ++k) {
        const int64_t a = order[k].second;
        const int32_t j = expert_[a];
        if (!want[j] || kept == c_[r] || load[j] == u_[j]) break;
        used_[a] = 1;
        ++kept, ++load[j];
        holders_[j].push_back(a);
      }
      pi_[r] = k < order.size() ? -order[k].first : (k > 0 ? -order[k - 1].first : 0.0);
      excess_[r] = c_[r] - kept;
      if (!pref_off.empty())
        for (int64_t q = pref_off[r]; q < pref_off[r + 1]; ++q) want[pref[q]] = 0;
    }
    int64_t into_t = 0, demand = 0;
    for (int64_t j = 0; j < E_; ++j) {
      if (load[j] < u_[j]) pi_[R_ + j] = pi_[t];
      to_t_[j] = load[j];
      into_t += to_t_[j];
    }
    for (int64_t r = 0; r < R_; ++r) demand += c_[r];
    excess_[t] = into_t - demand;
    saturate_violations();
  }

  // Add candidate arcs (sorted by client, not present yet); arcs that break optimality are saturated.
  void add_arcs(const std::vector<std::pair<int64_t, int32_t>>& pairs, const std::vector<double>& score) {
    std::vector<int64_t> off(R_ + 1, 0);
    std::vector<int32_t> expert;
    std::vector<double> sc;
    std::vector<char> used;
    const size_t m = expert_.size() + pairs.size();
    expert.reserve(m), sc.reserve(m), used.reserve(m);
    size_t k = 0;
    for (int64_t r = 0; r < R_; ++r) {
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a)
        expert.push_back(expert_[a]), sc.push_back(score_[a]), used.push_back(used_[a]);
      for (; k < pairs.size() && pairs[k].first == r; ++k)
        expert.push_back(pairs[k].second), sc.push_back(score[k]), used.push_back(0);
      off[r + 1] = static_cast<int64_t>(expert.size());
    }
    off_ = std::move(off), expert_ = std::move(expert), score_ = std::move(sc), used_ = std::move(used);
    client_of_.resize(expert_.size());
    for (auto& h : holders_) h.clear();
    for (int64_t r = 0; r < R_; ++r)
      for (int64_t a = off_[r]; a < off_[r + 1]; ++a) {
        client_of_[a] = static_cast<int32_t>(r);
        if (used_[a]) holders_[expert_[a]].push_back(a);
      }
    saturate_violations();
  }

  // Rounding allowance on reduced costs (potentials reach the size of `big`).
  double tolerance() const { return 1e-13 * big_; }

  // Push one unit along every unused arc with reduced cost below -tolerance(): the client gets a deficit and the
  // expert an excess, and every residual arc is back at reduced cost >= 0.
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
    while (!heap_.empty()) {
      const auto [d, v] = heap_.top();
      heap_.pop();
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
      } else {  // sink: back along j->t flow and short arcs
        for (int64_t j = 0; j < E_; ++j)
          if (to_t_[j] > 0) relax(R_ + j, d + std::max(0.0, pi_[t] - pi_[R_ + j]), -1);
        for (int32_t r : short_list_)
          if (short_[r] > 0) relax(r, d + std::max(0.0, -big_ + pi_[t] - pi_[r]), -1);
      }
    }
    if (sink < 0) throw std::logic_error("fedmoe assign: excess with no path to a deficit");
    // Potentials: pi += min(dist, dist[sink]) - dist[sink] keeps every reduced cost >= 0.
    const double ds = dist_[sink];
    for (int32_t v : settled_) pi_[v] += dist_[v] - ds;
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
          w = t;
        }
      } else {  // reached the sink: along j->t or a short arc
        const int64_t v = -2 - p;
        if (v < R_) {
          if (short_[v] == 0) short_list_.push_back(static_cast<int32_t>(v));
          short_[v] += static_cast<int32_t>(amount);
        } else {
          to_t_[v - R_] += static_cast<int32_t>(amount);
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
};

}  // namespace fedmoe
