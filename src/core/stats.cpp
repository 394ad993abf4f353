#include "packkv/stats.hpp"

namespace packkv {

MemoryBreakdown& MemoryBreakdown::operator+=(const MemoryBreakdown& o) {
  payload += o.payload;
  params += o.params;
  descriptors += o.descriptors;
  permutations += o.permutations;
  headers += o.headers;
  block_tables += o.block_tables;
  tail += o.tail;
  sinks += o.sinks;
  k_section_bytes += o.k_section_bytes;
  v_section_bytes += o.v_section_bytes;
  compressed_tokens += o.compressed_tokens;
  tail_tokens += o.tail_tokens;
  original_bytes += o.original_bytes;
  original_fp16_bytes += o.original_fp16_bytes;
  return *this;
}

}  // namespace packkv
