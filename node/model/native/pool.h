// A persistent pool of compute threads shared by node's MLX CPU kernels (int8_matmul.cpp,
// decode_attention.cpp): MLX calls them ~150 times per decode step, too often to start threads
// for each. After a decode step's job, workers spin for the next one for up to SPIN, then sleep:
// the jobs of one step come microseconds to ~100 us apart (MLX runs the cache writes and other
// small operations between them; a batch of agents has more of those) and steps ~1 ms apart
// (Python builds the next graph). Spinning ~25 us let the worker fall asleep between jobs, and
// every wake-up cost the caller the scheduler's latency: interleaved in one process, 2 ms of
// spinning took a 3-agent decode step from 13.0-13.7 to 11.7-13.1 ms and a one-agent step 11.1 ->
// 10.4-10.6 ms. Only the int8 decode products set that (Next::kernel); a job that BLAS products
// follow (a prefill's dequantized weights, its norms) sets a brief spin (Next::blas): a worker
// spinning beside sgemm on 2 cores slowed a 2k-token prefill by 20% and halved fp32 decode. Other
// jobs (attention, argmax) keep the setting (Next::unchanged): in an fp32 model BLAS follows them.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace node_native {

constexpr int MAX_THREADS = 64;
constexpr auto SPIN = std::chrono::microseconds(2000);
constexpr auto BRIEF_SPIN = std::chrono::microseconds(25);

enum class Next { kernel, blas, unchanged };  // what follows the job: how long workers spin for the next


class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return threads_; }

  void set_threads(int threads) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int limit = threads > 0 ? threads : (int)std::max(1L, cpus);
    threads_ = std::min(limit, MAX_THREADS);
  }

  // Runs job(part, parts) for part in [0, parts), the caller taking part 0.
  void run(int parts, const std::function<void(int, int)>& job, Next next = Next::unchanged) {
    if (next != Next::unchanged)  // read by workers after their next job
      spin_us_.store((next == Next::kernel ? SPIN : BRIEF_SPIN).count(), std::memory_order_relaxed);
    parts = std::max(1, std::min(parts, threads_));
    if (parts == 1) return job(0, 1);
    std::lock_guard<std::mutex> serial(run_mutex_);
    while ((int)workers_.size() < parts - 1) {
      int index = (int)workers_.size() + 1;
      unsigned seen = generation_.load();  // read here: the thread may start after the next job
      workers_.emplace_back([this, index, seen] { work(index, seen); });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      parts_ = parts;
      pending_.store(parts - 1);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job(0, parts);
    while (pending_.load(std::memory_order_acquire) > 0) {
#if defined(__x86_64__) && defined(__GNUC__)
      _mm_pause();
#endif
    }
  }

 private:
  void work(int index, unsigned seen) {
    auto spin = BRIEF_SPIN;
    for (;;) {
      unsigned now = seen;
      const auto deadline = std::chrono::steady_clock::now() + spin;
      for (int pauses = 1; (now = generation_.load(std::memory_order_acquire)) == seen; pauses++) {
#if defined(__x86_64__) && defined(__GNUC__)
        _mm_pause();
#endif
        if (pauses % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
      }
      if (now == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        now = generation_.load();
      }
      seen = now;
      if (stopping_) return;
      spin = std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
      if (index < parts_) {
        (*job_)(index, parts_);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_;
  std::atomic<unsigned> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  int parts_ = 0;
  std::atomic<long> spin_us_{BRIEF_SPIN.count()};
  bool stopping_ = false;
};

inline Pool& pool() {
  static Pool* p = [] {
    auto* made = new Pool();  // never destroyed: workers may outlive static destruction order
    made->set_threads(0);
    return made;
  }();
  return *p;
}


}  // namespace node_native
