// Memory accounting: every byte the cache holds is in exactly one bucket.
#pragma once

#include <cstddef>
#include <vector>

namespace packkv {

/// Bytes of one layer (or of the whole cache), by what they hold.
struct MemoryBreakdown {
  std::size_t payload = 0;       ///< bit-packed codes
  std::size_t params = 0;        ///< per-token / per-channel (step, min): fp16, or compact with its prefixes
  std::size_t descriptors = 0;   ///< per-pack (min, width)
  std::size_t permutations = 0;  ///< stored token orders
  std::size_t headers = 0;       ///< block headers, head directories, round offsets, alignment padding
  std::size_t block_tables = 0;  ///< tables locating each block, and the per-layer bookkeeping
  std::size_t tail = 0;          ///< uncompressed recent tokens (K and V, in the storage type), as allocated
  std::size_t sinks = 0;         ///< exact copies of the first tokens (CacheConfig::sink_tokens), K and V

  std::size_t metadata() const { return params + descriptors + permutations + headers + block_tables; }
  std::size_t total() const { return payload + metadata() + tail + sinks; }

  /// The same block bytes split by side: the K sections and the V sections of every block (their
  /// params, round tables, descriptors, packs and padding). The rest of total() (block headers,
  /// directories, permutations, trailing slack, block tables, the tail, the sinks) serves K and V alike.
  std::size_t k_section_bytes = 0;
  std::size_t v_section_bytes = 0;
  /// Bytes attributable to K (or V): its sections plus half of what both share.
  double k_bytes() const { return static_cast<double>(k_section_bytes) + shared_bytes() / 2.0; }
  double v_bytes() const { return static_cast<double>(v_section_bytes) + shared_bytes() / 2.0; }
  double shared_bytes() const { return static_cast<double>(total() - k_section_bytes - v_section_bytes); }

  std::size_t compressed_tokens = 0;  ///< token-layers held in packed blocks
  std::size_t tail_tokens = 0;        ///< token-layers held uncompressed
  std::size_t original_bytes = 0;     ///< K and V of all held tokens in the storage type
  std::size_t original_fp16_bytes = 0;

  /// Compression ratio against the storage type and against fp16 (all bytes counted).
  double ratio() const { return total() ? static_cast<double>(original_bytes) / static_cast<double>(total()) : 0.0; }
  double ratio_vs_fp16() const {
    return total() ? static_cast<double>(original_fp16_bytes) / static_cast<double>(total()) : 0.0;
  }

  MemoryBreakdown& operator+=(const MemoryBreakdown& o);
};

/// The block pool: pages reserved from the system and how full they are.
struct PoolStats {
  std::size_t page_bytes = 0;
  std::size_t pages_reserved = 0;   ///< pages held by the pool (in use or cached for reuse)
  std::size_t reserved_bytes = 0;   ///< pages_reserved * page_bytes
  std::size_t slot_bytes = 0;       ///< bytes of allocated slots (block sizes rounded to size classes)
  std::size_t live_bytes = 0;       ///< bytes of live blocks
  std::size_t live_blocks = 0;
  /// 1 - live / reserved: the share of reserved memory that holds no block data.
  double fragmentation() const {
    return reserved_bytes ? 1.0 - static_cast<double>(live_bytes) / static_cast<double>(reserved_bytes) : 0.0;
  }
};

struct MemoryStats {
  MemoryBreakdown total;
  std::vector<MemoryBreakdown> layers;
  PoolStats pool;
  std::size_t scratch_bytes = 0;   ///< staging and workspaces (device backends)
  /// Packed bytes that forked sequences share instead of holding copies: what independent copies
  /// would add. A shared block is counted once in `total` and `layers` (where the walk over the
  /// sequences meets it first).
  std::size_t shared_block_bytes = 0;
  /// CacheConfig::memory_budget_bytes (0: no budget) and what is left of it: budget_bytes -
  /// resident_bytes (0 without a budget). A scheduler compares it with worst_case_bytes().
  std::size_t budget_bytes = 0;
  std::size_t free_budget_bytes = 0;
  /// Resident bytes that release_unused_memory() would return now (compaction, cached pages).
  /// Appends reclaim by themselves when that lets them fit.
  std::size_t reclaimable_bytes = 0;
  /// What counts against the memory budget: everything in `total`, plus the pool's slack
  /// (pool.reserved_bytes - pool.live_bytes) and scratch_bytes.
  std::size_t resident_bytes = 0;
};

}  // namespace packkv
