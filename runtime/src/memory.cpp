// DeviceBuffer: host memory on the CPU backend, cudaMalloc on CUDA devices; tracks the peak.
#include <ringcast/error.hpp>
#include <ringcast/memory.hpp>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if RINGCAST_WITH_CUDA
#include <ringcast/cuda_check.hpp>
#endif

namespace ringcast {
namespace {

std::atomic<std::size_t> g_current{0};
std::atomic<std::size_t> g_peak{0};

void note_alloc(std::size_t bytes) {
  const std::size_t now = g_current.fetch_add(bytes) + bytes;
  std::size_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

constexpr std::size_t kHostAlignment = 64;

#if RINGCAST_WITH_CUDA
void sync_stream(Stream stream) {
  RINGCAST_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

// On `stream`, then waited for: a cudaMemcpy from pageable memory may return before its DMA lands, and
// nothing orders the legacy default stream with the non-blocking streams the runtime uses.
void copy_on_stream(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, Stream stream) {
  RINGCAST_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, static_cast<cudaStream_t>(stream)));
  sync_stream(stream);
}
#endif

}  // namespace

DeviceBuffer::DeviceBuffer(std::size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (bytes == 0) return;
  if (device.kind == DeviceKind::kCpu) {
    data_ = std::aligned_alloc(kHostAlignment, (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment);
    if (!data_) throw std::bad_alloc();
  } else {
#if RINGCAST_WITH_CUDA
    RINGCAST_CUDA_CHECK(cudaMalloc(&data_, bytes));
#else
    RINGCAST_THROW("a CUDA buffer was requested but this build has no CUDA backend");
#endif
  }
  note_alloc(bytes);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      device_(other.device_) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    device_ = other.device_;
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { release(); }

void DeviceBuffer::release() noexcept {
  if (!data_) return;
  if (device_.kind == DeviceKind::kCpu) {
    std::free(data_);
  } else {
#if RINGCAST_WITH_CUDA
    cudaFree(data_);  // no throw from a destructor; a failure here means the context is already gone
#endif
  }
  g_current.fetch_sub(bytes_);
  data_ = nullptr;
  bytes_ = 0;
}

void copy_from_host(void* dst, const void* src, std::size_t bytes, const Device& device, Stream stream) {
  if (bytes == 0) return;
  if (device.kind == DeviceKind::kCpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if RINGCAST_WITH_CUDA
  copy_on_stream(dst, src, bytes, cudaMemcpyHostToDevice, stream);
#else
  (void)stream;
  RINGCAST_THROW("a CUDA copy was requested but this build has no CUDA backend");
#endif
}

void copy_to_host(void* dst, const void* src, std::size_t bytes, const Device& device, Stream stream) {
  if (bytes == 0) return;
  if (device.kind == DeviceKind::kCpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if RINGCAST_WITH_CUDA
  copy_on_stream(dst, src, bytes, cudaMemcpyDeviceToHost, stream);
#else
  (void)stream;
  RINGCAST_THROW("a CUDA copy was requested but this build has no CUDA backend");
#endif
}

void DeviceBuffer::copy_from_host(const void* src, std::size_t bytes, std::size_t offset, Stream stream) {
  RINGCAST_CHECK(offset + bytes <= bytes_, "copy of {} bytes at offset {} overruns a buffer of {} bytes", bytes,
                 offset, bytes_);
  ringcast::copy_from_host(static_cast<char*>(data_) + offset, src, bytes, device_, stream);
}

void DeviceBuffer::copy_to_host(void* dst, std::size_t bytes, std::size_t offset, Stream stream) const {
  RINGCAST_CHECK(offset + bytes <= bytes_, "copy of {} bytes at offset {} overruns a buffer of {} bytes", bytes,
                 offset, bytes_);
  ringcast::copy_to_host(dst, static_cast<const char*>(data_) + offset, bytes, device_, stream);
}

void synchronize(const Device& device, Stream stream) {
  if (device.kind == DeviceKind::kCpu) return;
#if RINGCAST_WITH_CUDA
  sync_stream(stream);
#else
  (void)stream;
#endif
}

std::size_t peak_allocated_bytes() { return g_peak.load(); }
void reset_peak_allocated_bytes() { g_peak.store(g_current.load()); }

}  // namespace ringcast
