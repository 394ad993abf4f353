// The CUDA backend's writes: value checks (strict mode), and the two phases of a write (backend.hpp):
// prepare_write() plans every page, table, ring, staging and upload the commit will need without
// changing anything; commit_write() allocates all of it first, then queues the kernels (encode,
// place, copy, tail write) and copies. Callers hold the context's mutex.
#pragma once

#include <deque>
#include <memory>
#include <span>

#include "cuda/device_context.hpp"

namespace packkv::detail::cuda {

/// A write's K and V rotated as the config asks, into a buffer that lives as long as the result
/// (freed in stream order after the write's kernels).
template <class T>
RotatedInput<T> rotate_write_input(DeviceContext& ctx, const T* k, const T* v, std::size_t rows);
template <class T>
void check_values(DeviceContext& ctx, std::span<const LayerWrite<T>> writes);
template <class T>
std::unique_ptr<PreparedWrite> prepare_write(DeviceContext& ctx, std::span<const LayerWrite<T>> writes);
template <class T>
void commit_write(DeviceContext& ctx, PreparedWrite& prepared);
/// The CUDA stream the write was made on (LayerWrite::stream; null: the cache's).
template <class T>
void* caller_stream(const PreparedWrite& prepared);
/// An upper bound of the resident growth of appending `queries` (device tokens): what
/// prepare_write would count, without the device error check. `fresh` holds an empty store for
/// each query without one (made by the caller: a store's destructor takes the context's mutex).
template <class T>
std::size_t worst_case_growth(DeviceContext& ctx, std::span<const GrowthQuery> queries,
                              std::deque<CudaLayerStore>& fresh);

}  // namespace packkv::detail::cuda
