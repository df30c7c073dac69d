// SolverOptions: the tuning constants of the assignment solver, in one place.
//
// None of them changes an answer: the certificate proves every result optimal on the full matrix, and
// any choice here only moves work between the auctions, the exact flow solver and the certificate's
// repair rounds. They are compile-time constants (kSolverOptions); the values were chosen on the
// alignment experiment's rounds (100,000 clients x 4,096 experts) and bench_assign's instances.
#pragma once

#include <cstdint>

namespace fedmoe {

struct SolverOptions {
  // ---------------------------------------------------------------- row sample (start prices, cold)
  // Rows sampled for the prices of a large cold problem: one in `sample_stride` (a fraction, no unit).
  // A sample an eighth the size is cheap to solve and its prices are close enough to start from.
  int64_t sample_stride = 8;
  // Entries (rows x experts) up to which a sample is solved exactly, every pair a candidate, instead of
  // sampled again; about what the exact flow solver handles faster than another level of sampling.
  int64_t sample_base_entries = int64_t{1} << 16;
  // Rows below which the saturating auction does not sample for prices and starts from zero prices: a
  // smaller problem solves from zero about as fast as its sample would.
  int64_t sample_min_rows = 4096;
  // The last epsilon of a sample's auction, scale * 2^-sample_bits (bits; scale: eps_scale): prices to
  // start from need not be exact, only near.
  int sample_bits = 20;

  // ---------------------------------------------------------------- forward auction (general case)
  // Bids per unit of demand (bids / (sum c + rows)) after which the forward auction gives up: it only
  // speeds the exact solver up, so it must not cost more than that solver would.
  int64_t max_bids_per_unit = 8;
  // Epsilon of a coarse forward auction, range * 2^-contested_eps_bits (bits): coarse enough to converge
  // where many experts are contested, fine enough to leave the exact solver little to move.
  int contested_eps_bits = 18;
  // Bid budget per unit of demand of the first, zero-price forward auction: it suits problems where few
  // experts are contested, and is abandoned quickly (for warm or sampled prices) where they are not.
  int cold_bids_per_unit = 1;

  // ---------------------------------------------------------------- saturating auction: epsilons (bits)
  // Each epsilon is scale * 2^-bits, scale from eps_scale (the largest spread of scores within a row).
  // First epsilon from zero prices where few experts are contested (fine).
  int fine_bits = 15;
  // First epsilon from zero prices otherwise (coarse: large raises converge fast from far away).
  int coarse_bits = 6;
  // First epsilon from a sample's or the caller's warm prices when they nearly clear (fine_start).
  int warm_bits = 19;
  // Epsilon from warm prices that do not nearly clear, and where a fine phase stalls (medium).
  int medium_bits = 9;
  // Epsilon shrinks by 2^-step_bits per phase: 8x per phase keeps few phases and little rebidding.
  int step_bits = 3;
  // Epsilon never goes below magnitude * 2^-floor_bits (magnitude: of the scores and prices): smaller
  // raises would vanish in double rounding (53 bits) once added to prices of that magnitude.
  int floor_bits = 42;

  // ---------------------------------------------------------------- saturating auction: budgets
  // Bids per unit of demand (bids / (places + rows)) after which a fine phase counts as stalled.
  int64_t fine_bids_per_unit = 16;
  // The same for any other phase; more means the instance does not suit the auction (flow solver then).
  int64_t bids_per_unit = 64;
  // A row rescan counts as E / rescan_bids_divisor bids in a fine phase's budget: about what rescanning a
  // 4,096-wide row costs against a bid.
  int64_t rescan_bids_divisor = 64;
  // fine_start: open at fine epsilon when at most 1 / near_exact of the demand lands beyond the expert
  // capacities at the start prices (they nearly clear; a fraction, no unit).
  int64_t near_exact = 400;
  // fine_start: also when the median row's margin between its c_i-th and next listed reduced score is
  // below 1 / swamped of a medium epsilon (medium raises would make clients trade places at every bid).
  int64_t swamped = 16;

  // ---------------------------------------------------------------- candidate lists
  // Auction lists start at c_i + list_factor * extra experts (extra: assign's `candidates`): a rescan
  // costs a whole row, longer lists go stale less often.
  int list_factor = 2;
  // Room of a saturating-auction list beyond c_i (experts), for rescans that double a stale list.
  int longest_extra = 64;
  // select_row keeps its threshold by insertion into a sorted array up to this many entries (L + 1),
  // by nth_element above: insertion wins while most block maxima fail a single comparison.
  int64_t insert_top = 32;
};

inline constexpr SolverOptions kSolverOptions{};

}  // namespace fedmoe
