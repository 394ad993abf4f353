// A reader-writer lock that does not starve writers: once a writer waits, new readers queue
// behind it. (std::shared_mutex on glibc prefers readers, so a steady stream of attention calls
// could keep an append waiting forever.)
#pragma once

#include <condition_variable>
#include <mutex>

namespace packkv::detail {

class RwLock {
 public:
  void lock_shared() {
    std::unique_lock<std::mutex> guard(mutex_);
    changed_.wait(guard, [this] { return !writing_ && writers_waiting_ == 0; });
    ++readers_;
  }
  void unlock_shared() {
    std::unique_lock<std::mutex> guard(mutex_);
    if (--readers_ == 0) changed_.notify_all();
  }
  void lock() {
    std::unique_lock<std::mutex> guard(mutex_);
    ++writers_waiting_;
    changed_.wait(guard, [this] { return !writing_ && readers_ == 0; });
    --writers_waiting_;
    writing_ = true;
  }
  void unlock() {
    std::unique_lock<std::mutex> guard(mutex_);
    writing_ = false;
    changed_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int readers_ = 0;
  int writers_waiting_ = 0;
  bool writing_ = false;
};

}  // namespace packkv::detail
