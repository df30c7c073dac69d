// Min-cost flow at maximum flow value on a residual graph in CSR form.
//
// The graph is built once from a list of arcs (each stored with its paired reverse arc). Two solvers run
// on it in turn: Dinic's algorithm raises the flow from any feasible start to the maximum value, then
// cost-scaling push-relabel (Goldberg-Tarjan "refine" with epsilon divided by kScale each phase) lowers
// the cost at that fixed value. Costs are integers already multiplied by (number of nodes + 1), so the
// final epsilon = 1 gives an exactly optimal flow and node prices that are dual-feasible to within 1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <vector>

namespace fedmoe {

struct ArcSpec {
  int32_t tail, head, cap;
  int64_t cost;
};

class FlowGraph {
 public:
  FlowGraph(int num_nodes, const std::vector<ArcSpec>& arcs) : n_(num_nodes), first_(num_nodes + 1, 0) {
    for (const ArcSpec& a : arcs) {
      ++first_[a.tail + 1];
      ++first_[a.head + 1];
    }
    for (int v = 0; v < n_; ++v) first_[v + 1] += first_[v];
    const int64_t m = first_[n_];
    head_.resize(m);
    rev_.resize(m);
    cap_.resize(m);
    cost_.resize(m);
    std::vector<int64_t> fill(first_.begin(), first_.end() - 1);
    for (const ArcSpec& a : arcs) {
      const int64_t f = fill[a.tail]++, r = fill[a.head]++;
      head_[f] = a.head, cap_[f] = a.cap, cost_[f] = a.cost, rev_[f] = r;
      head_[r] = a.tail, cap_[r] = 0, cost_[r] = -a.cost, rev_[r] = f;
    }
  }

  int num_nodes() const { return n_; }
  int64_t begin(int v) const { return first_[v]; }
  int64_t end(int v) const { return first_[v + 1]; }
  int32_t head(int64_t a) const { return head_[a]; }
  int32_t residual(int64_t a) const { return cap_[a]; }
  int64_t cost(int64_t a) const { return cost_[a]; }
  int64_t reverse(int64_t a) const { return rev_[a]; }

  // Make arc a unusable (its residual capacity 0) without changing the flow.
  void freeze(int64_t a) { cap_[a] = 0; }

  void push(int64_t a, int32_t amount) {
    cap_[a] -= amount;
    cap_[rev_[a]] += amount;
  }

  // Dinic: augment from s to t until no augmenting path is left. Returns the flow added.
  int64_t max_flow(int s, int t) {
    int64_t total = 0;
    std::vector<int32_t> level(n_);
    std::vector<int64_t> cur(n_);
    std::vector<int64_t> path;  // arcs from s
    std::vector<int32_t> queue(n_);
    for (;;) {
      std::fill(level.begin(), level.end(), -1);
      int qh = 0, qt = 0;
      queue[qt++] = s;
      level[s] = 0;
      while (qh < qt && level[t] < 0) {
        const int v = queue[qh++];
        for (int64_t a = first_[v]; a < first_[v + 1]; ++a) {
          const int w = head_[a];
          if (cap_[a] > 0 && level[w] < 0) {
            level[w] = level[v] + 1;
            queue[qt++] = w;
          }
        }
      }
      if (level[t] < 0) return total;
      for (int v = 0; v < n_; ++v) cur[v] = first_[v];
      path.clear();
      int v = s;
      for (;;) {
        if (v == t) {
          int32_t bottleneck = INT32_MAX;
          for (int64_t a : path) bottleneck = std::min(bottleneck, cap_[a]);
          size_t cut = path.size();
          for (size_t k = 0; k < path.size(); ++k) {
            push(path[k], bottleneck);
            if (cap_[path[k]] == 0 && cut == path.size()) cut = k;
          }
          total += bottleneck;
          path.resize(cut);  // resume from the tail of the first saturated arc
          v = path.empty() ? s : head_[path.back()];
          continue;
        }
        int64_t& a = cur[v];
        while (a < first_[v + 1] && !(cap_[a] > 0 && level[head_[a]] == level[v] + 1)) ++a;
        if (a < first_[v + 1]) {
          path.push_back(a);
          v = head_[a];
        } else {
          level[v] = -1;  // dead end for this phase
          if (path.empty()) break;
          path.pop_back();
          v = path.empty() ? s : head_[path.back()];
          ++cur[v];
        }
      }
    }
  }

  // Largest epsilon for which the current flow is epsilon-optimal under `price` (at least 1).
  int64_t optimality_epsilon(const std::vector<int64_t>& price) const {
    int64_t eps = 1;
    for (int v = 0; v < n_; ++v)
      for (int64_t a = first_[v]; a < first_[v + 1]; ++a)
        if (cap_[a] > 0) eps = std::max(eps, -(cost_[a] + price[v] - price[head_[a]]));
    return eps;
  }

  // Cost scaling from epsilon `eps` down to 1; keeps the flow value, makes the flow min-cost.
  void min_cost(std::vector<int64_t>& price, int64_t eps) {
    constexpr int64_t kScale = 8;
    std::vector<int64_t> excess(n_, 0), cur(n_);
    std::deque<int32_t> active;
    std::vector<char> queued(n_, 0);
    for (;;) {
      eps = std::max<int64_t>(1, eps / kScale);
      refine(price, eps, excess, cur, active, queued);
      if (eps == 1) return;
    }
  }

 private:
  void refine(std::vector<int64_t>& price, int64_t eps, std::vector<int64_t>& excess, std::vector<int64_t>& cur,
              std::deque<int32_t>& active, std::vector<char>& queued) {
    // Saturating only the arcs below -eps (not all negative ones) makes the flow eps-optimal and keeps
    // the work proportional to how far the prices are from eps-optimal: a warm start stays warm.
    for (int v = 0; v < n_; ++v) {
      for (int64_t a = first_[v]; a < first_[v + 1]; ++a) {
        if (cap_[a] > 0 && cost_[a] + price[v] - price[head_[a]] < -eps) {
          const int32_t amount = cap_[a];
          push(a, amount);
          excess[v] -= amount;
          excess[head_[a]] += amount;
        }
      }
    }
    for (int v = 0; v < n_; ++v) {
      cur[v] = first_[v];
      if (excess[v] > 0) {
        active.push_back(v);
        queued[v] = 1;
      }
    }
    while (!active.empty()) {
      const int v = active.front();
      active.pop_front();
      queued[v] = 0;
      while (excess[v] > 0) {
        int64_t& a = cur[v];
        const int64_t pv = price[v];
        while (a < first_[v + 1] && !(cap_[a] > 0 && cost_[a] + pv - price[head_[a]] < 0)) ++a;
        if (a < first_[v + 1]) {
          const int w = head_[a];
          const int32_t amount = static_cast<int32_t>(std::min<int64_t>(excess[v], cap_[a]));
          push(a, amount);
          excess[v] -= amount;
          excess[w] += amount;
          if (excess[w] > 0 && !queued[w]) {
            active.push_back(w);
            queued[w] = 1;
          }
        } else {  // relabel: lower the price just enough to make the best residual arc admissible
          int64_t best = INT64_MIN;
          for (int64_t b = first_[v]; b < first_[v + 1]; ++b)
            if (cap_[b] > 0) best = std::max(best, price[head_[b]] - cost_[b]);
          price[v] = best - eps;
          a = first_[v];
        }
      }
    }
  }

  int n_;
  std::vector<int64_t> first_;
  std::vector<int32_t> head_;
  std::vector<int64_t> rev_;
  std::vector<int32_t> cap_;
  std::vector<int64_t> cost_;
};

}  // namespace fedmoe
