// A persistent team of threads that run one step together: the caller is member 0, workers 1 .. T-1.
//
// The fused step kernels split the work of one step across cores (channels of an SSM, output panels
// of a GEMM) when a batch is too small to split by rows. Such a step synchronises dozens of times,
// so the workers are persistent and the barrier is one epoch counter per member, each in its own
// cache line (a member publishes its epoch, then reads its partners'): waiting spins (with pause)
// for a bounded time, then sleeps on a futex (a loaded machine does not lose a core to spinning). Workers flush denormals like the callers do.
//
//   Part part = ...;                  // member m of T (T = 1: no team, sync() is a no-op)
//   auto [lo, hi] = part.range(n);    // this member's share of n units (contiguous, balanced)
//   part.sync();                      // all members reach this point before any continues
//
// Team::run(T, f) runs f(part) on T members and returns when all have finished. One run at a time
// per team: a concurrent caller gets T = 1 (the results do not depend on T, see the kernels).
// After fork() the child starts a new team (the parent's workers do not exist there).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <x86intrin.h>
#endif

namespace s4step {

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

static inline uint64_t ticks() {
#if defined(__x86_64__) || defined(_M_X64)
  return __rdtsc();
#else
  return (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

// Spin budgets in TSC ticks (~2-4 GHz): a barrier partner is usually microseconds away; between
// two steps called from Python the workers wait a little longer before sleeping.
constexpr uint64_t kBarrierSpin = 100000;
constexpr uint64_t kJobSpin = 300000;

// Wait until word != old: spin for `budget` ticks, then sleep on the futex (sleepers counts those asleep).
static inline void wait_change(std::atomic<uint32_t>& word, uint32_t old, std::atomic<uint32_t>& sleepers,
                               uint64_t budget) {
  const uint64_t start = ticks();
  while (word.load(std::memory_order_acquire) == old) {
    if (ticks() - start > budget) {
      sleepers.fetch_add(1, std::memory_order_seq_cst);
      while (word.load(std::memory_order_seq_cst) == old)
        syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
      sleepers.fetch_sub(1, std::memory_order_seq_cst);
      return;
    }
    cpu_relax();
  }
}

class Team;

struct Part {
  int m = 0, T = 1;
  Team* team = nullptr;
  inline void sync() const;
  // [lo, hi) of n units for this member: contiguous, sizes differ by at most one
  std::pair<int64_t, int64_t> range(int64_t n) const { return {n * m / T, n * (m + 1) / T}; }
};

class Team {
 public:
  // f(part) on T members (T clamped to >= 1); returns when every member has returned.
  void run(int T, const std::function<void(const Part&)>& f) {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (T <= 1 || !lock.owns_lock()) {
      f(Part{});
      return;
    }
    T = std::min(T, kMaxTeam);
    grow(T - 1);
    job_ = &f;
    base_ = flags_[0].epoch.load(std::memory_order_relaxed);  // every member starts the job here
    // the job word carries T: a worker that wakes late reads the T of the job it joins
    const uint32_t word = ((job_word_.load(std::memory_order_relaxed) >> 4) + 1) << 4 | (uint32_t)T;
    job_word_.store(word, std::memory_order_seq_cst);
    if (job_sleepers_.load(std::memory_order_seq_cst) > 0)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&job_word_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    f(Part{0, T, this});
    barrier(0, T);  // every member has finished
    job_ = nullptr;
  }

  // Member m of T arrives: it publishes its next epoch, then waits until every other member's
  // epoch has reached it (each flag in its own cache line: one line transfer per partner).
  void barrier(int m, int T) {
    Flag& mine = flags_[m];
    const uint32_t e = mine.epoch.load(std::memory_order_relaxed) + 1;
    mine.epoch.store(e, std::memory_order_seq_cst);
    if (mine.sleepers.load(std::memory_order_seq_cst) > 0)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&mine.epoch), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    for (int j = 0; j < T; ++j)
      if (j != m) wait_reach(flags_[j], e);
  }

  static Team& instance() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { current() = nullptr; }); });
    Team*& t = current();
    if (t == nullptr) t = new Team();  // never destroyed: workers sleep until the process exits
    return *t;
  }

 private:
  static constexpr int kMaxTeam = 15;  // T travels in 4 bits of the job word
  struct alignas(64) Flag {
    std::atomic<uint32_t> epoch{0};     // barriers this member has arrived at (wraps)
    std::atomic<uint32_t> sleepers{0};  // members asleep waiting for it
  };

  std::mutex mutex_;
  const std::function<void(const Part&)>* job_ = nullptr;
  uint32_t base_ = 0;
  std::vector<std::thread> workers_;
  Flag flags_[kMaxTeam];
  alignas(64) std::atomic<uint32_t> job_word_{0};  // (job number << 4) | T
  std::atomic<uint32_t> job_sleepers_{0};

  static bool reached(uint32_t epoch, uint32_t e) { return (int32_t)(epoch - e) >= 0; }

  static void wait_reach(Flag& f, uint32_t e) {
    if (reached(f.epoch.load(std::memory_order_acquire), e)) return;
    const uint64_t start = ticks();
    while (ticks() - start < kBarrierSpin) {
      cpu_relax();
      if (reached(f.epoch.load(std::memory_order_acquire), e)) return;
    }
    f.sleepers.fetch_add(1, std::memory_order_seq_cst);
    for (;;) {
      const uint32_t now = f.epoch.load(std::memory_order_seq_cst);
      if (reached(now, e)) break;
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&f.epoch), FUTEX_WAIT_PRIVATE, now, nullptr, nullptr, 0);
    }
    f.sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }

  static Team*& current() {
    static Team* t = nullptr;
    return t;
  }

  void grow(int workers) {
    while ((int)workers_.size() < workers) {
      const int m = (int)workers_.size() + 1;
      const uint32_t seen = job_word_.load(std::memory_order_acquire);
      workers_.emplace_back([this, m, seen] { loop(m, seen); });
      workers_.back().detach();
    }
  }

  void loop(int m, uint32_t seen) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(_mm_getcsr() | 0x8040);  // flush denormals, as the callers' FlushDenormals does
#endif
    for (;;) {
      wait_change(job_word_, seen, job_sleepers_, kJobSpin);
      seen = job_word_.load(std::memory_order_acquire);
      const int T = (int)(seen & 15u);
      if (m < T) {
        flags_[m].epoch.store(base_, std::memory_order_release);  // a member idle in earlier jobs catches up
        (*job_)(Part{m, T, this});
        barrier(m, T);
      }
    }
  }
};

inline void Part::sync() const {
  if (T > 1) team->barrier(m, T);
}

}  // namespace s4step

namespace s4step {

// Picks between one thread and a team of T for a repeated call, by timing both: results do not depend
// on the choice, only the speed does, and on a shared machine the faster one can change (a partner
// thread that is descheduled makes every barrier wait). Each call reports its wall time per unit of
// work; the tuner compares the medians of the last kWindow timings of each choice (one stalled call,
// or the first call of a team, which starts its threads and warms its caches, does not decide), the
// first timing of each choice is discarded, both are tried alternately until each has kWindow, and
// the other choice is retried on 1 call in kExplore (1 in kExploreFar while it is more than 25 %
// slower: each retrial of a much slower choice costs) so that a change of load is followed. A retrial
// that beats the favourite's median replaces the retried choice's older timings at once, so a load
// spike that once made the team look slow is forgotten on the first retrial after it ends.
class ThreadTuner {
 public:
  static constexpr int kWindow = 5, kExplore = 16, kExploreFar = 64;

  // The thread count for the next call: 1 or T (T <= 1: 1).
  int pick(int T) {
    if (T <= 1) return 1;
    ++calls_;
    int which;
    int explore = kExplore;
    if (count_[0] < kWindow || count_[1] < kWindow) {
      which = calls_ & 1;  // both, alternately, first
    } else {
      const double one = median(0), team = median(1);
      which = team < one ? 1 : 0;
      if (std::max(one, team) > 1.25 * std::min(one, team)) explore = kExploreFar;
    }
    if (calls_ % explore == 0) which ^= 1;  // keep sampling the other
    return which ? T : 1;
  }

  void record(int threads, double seconds_per_unit) {
    const int which = threads > 1 ? 1 : 0;
    if (!warm_[which]) {  // the first call of a choice: thread start-up and cold caches
      warm_[which] = true;
      return;
    }
    if (count_[0] == kWindow && count_[1] == kWindow) {
      const int favourite = median(1) < median(0) ? 1 : 0;
      if (which != favourite && seconds_per_unit < median(favourite)) {
        // a retrial beat the favourite: the retried choice's older timings (from a moment when another job
        // held a core, say) are stale, so they go, and the choice is measured afresh on the next calls;
        // if it is slower after all, its median rises again within a few calls
        std::fill(last_[which], last_[which] + kWindow, seconds_per_unit);
        next_[which] = 0;
        return;
      }
    }
    last_[which][next_[which]] = seconds_per_unit;
    next_[which] = (next_[which] + 1) % kWindow;
    count_[which] = std::min(count_[which] + 1, kWindow);
  }

 private:
  double last_[2][kWindow] = {};
  int next_[2] = {0, 0}, count_[2] = {0, 0};
  bool warm_[2] = {false, false};
  int64_t calls_ = 0;

  double median(int which) const {
    double v[kWindow];
    std::copy(last_[which], last_[which] + count_[which], v);
    std::sort(v, v + count_[which]);
    return v[count_[which] / 2];
  }
};

static inline double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace s4step
