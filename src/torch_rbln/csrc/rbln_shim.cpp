// torch_rbln's C++ shim: the parts of an eager PrivateUse1 device that PyTorch only accepts from
// C++. Kernels stay in Python (torch_rbln/_dispatch.py); this file gives them
//   * an allocator, so storages are real and UntypedStorage(n, device="rbln"), clone, deepcopy and
//     torch.load work; it counts bytes per device (the virtual device's DRAM accounting);
//   * a device guard with a current device per thread and N devices (rbln:0..rbln:N-1);
//   * PrivateUse1 hooks, and the metadata kernels (empty, views, resize_, set_) PyTorch's own CPU
//     code implements generically;
//   * two zero-copy bridges, as_cpu (device tensor -> CPU alias of the same bytes, for kernels) and
//     adopt (CPU result -> device tensor owning those bytes, accounted).
// Device memory is host memory: the virtual NPU's DRAM is emulated, only its size is accounted.
#include <Python.h>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/unfold_native.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "round16.h"  // rebel/device/csrc: the 16-bit rounder, shared with rebel's executor

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace {

constexpr c10::DeviceType kRbln = c10::DeviceType::PrivateUse1;
constexpr int kMaxDevices = 64;

std::atomic<int64_t> g_allocated[kMaxDevices];
std::atomic<int64_t> g_peak[kMaxDevices];
std::atomic<int64_t> g_count[kMaxDevices];      // live allocations
std::atomic<int64_t> g_alloc_calls[kMaxDevices];
std::atomic<int64_t> g_capacity[kMaxDevices];   // 0: unlimited
std::atomic<int> g_device_count{1};
thread_local int g_current = 0;

void check_index(int d) {
  TORCH_CHECK(d >= 0 && d < g_device_count.load(), "rbln:", d, " does not exist: the virtual machine has ",
              g_device_count.load(), " rbln device(s) (0..", g_device_count.load() - 1, ")");
}

void account(int d, int64_t nbytes) {
  if (nbytes > 0) {
    int64_t cap = g_capacity[d].load();
    int64_t now = g_allocated[d].fetch_add(nbytes) + nbytes;
    if (cap > 0 && now > cap) {
      g_allocated[d].fetch_sub(nbytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "rbln:", d, " out of device DRAM: tried to allocate ",
                       nbytes, " bytes with ", now - nbytes, " of ", cap,
                       " bytes in use (torch.rbln.memory_summary() shows what holds it)");
    }
    int64_t peak = g_peak[d].load();
    while (now > peak && !g_peak[d].compare_exchange_weak(peak, now)) {}
  }
  g_count[d].fetch_add(1);
  g_alloc_calls[d].fetch_add(1);
}

// The context each device DataPtr owns: what to release, and how much to un-account.
struct Block {
  void* data;                // malloc'ed bytes, or nullptr when `adopted` owns them
  c10::Storage adopted;      // a CPU storage whose bytes this device block took over
  int device;
  int64_t nbytes;
};

void free_block(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  g_allocated[b->device].fetch_sub(b->nbytes);
  g_count[b->device].fetch_sub(1);
  if (b->data) std::free(b->data);
  delete b;
}

// A DeviceAllocator, so torch.accelerator's memory calls (empty_cache, memory_stats, ...) work with
// rbln as the current accelerator. Blocks are released when freed: there is no cache to empty.
struct RblnAllocator final : c10::DeviceAllocator {
  c10::DataPtr allocate(size_t nbytes) override {
    int d = g_current;
    account(d, static_cast<int64_t>(nbytes));
    void* data = nbytes ? std::malloc(nbytes) : nullptr;
    if (nbytes && !data) {
      g_allocated[d].fetch_sub(nbytes);
      g_count[d].fetch_sub(1);
      TORCH_CHECK_WITH(OutOfMemoryError, false, "host memory exhausted emulating rbln:", d);
    }
    return {data, new Block{data, {}, d, static_cast<int64_t>(nbytes)}, &free_block,
            c10::Device(kRbln, static_cast<c10::DeviceIndex>(d))};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  bool initialized() override { return true; }
  void emptyCache(c10::MempoolId_t) override {}
  void recordStream(const c10::DataPtr&, c10::Stream) override {}
  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    c10::CachingDeviceAllocator::DeviceStats stats;
    for (auto* array : {&stats.allocated_bytes, &stats.reserved_bytes, &stats.active_bytes,
                        &stats.requested_bytes}) {
      auto& all = (*array)[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
      all.current = g_allocated[device].load();
      all.peak = g_peak[device].load();
    }
    auto& count = stats.allocation[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    count.current = g_count[device].load();
    count.allocated = g_alloc_calls[device].load();
    return stats;
  }
  void resetAccumulatedStats(c10::DeviceIndex device) override { g_alloc_calls[device].store(0); }
  void resetPeakStats(c10::DeviceIndex device) override {
    g_peak[device].store(g_allocated[device].load());
  }
};
RblnAllocator g_allocator;

struct RblnGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kRbln; }
  c10::Device exchangeDevice(c10::Device d) const override {
    c10::Device old = getDevice();
    if (d.index() != old.index()) setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return c10::Device(kRbln, static_cast<c10::DeviceIndex>(g_current)); }
  void setDevice(c10::Device d) const override {
    if (d.index() < 0) return;
    check_index(d.index());
    g_current = d.index();
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.index() >= 0) g_current = d.index();
  }
  c10::Stream getStream(c10::Device d) const noexcept override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream getDefaultStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream getNewStream(c10::Device d, int) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, s.device());
  }
  c10::DeviceIndex deviceCount() const noexcept override {
    return static_cast<c10::DeviceIndex>(g_device_count.load());
  }
  // The emulated device runs each op to completion before returning: events and streams are
  // always complete.
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, RblnGuard);

void resize_bytes(const c10::Storage& storage, size_t newsize) {
  c10::StorageImpl* impl = storage.unsafeGetStorageImpl();
  TORCH_CHECK(impl->resizable(), "this rbln storage is not resizable");
  c10::DeviceGuard guard(storage.device());
  c10::DataPtr fresh = g_allocator.allocate(newsize);
  size_t keep = std::min(newsize, impl->nbytes());
  if (keep) std::memcpy(fresh.get(), impl->data(), keep);
  impl->set_data_ptr_noswap(std::move(fresh));
  impl->set_nbytes(newsize);
}

struct RblnHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return static_cast<c10::DeviceIndex>(g_device_count.load()); }
  void setCurrentDevice(c10::DeviceIndex d) const override { check_index(d); g_current = d; }
  c10::DeviceIndex getCurrentDevice() const override { return static_cast<c10::DeviceIndex>(g_current); }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex d) const override {
    auto old = g_current; setCurrentDevice(d); return static_cast<c10::DeviceIndex>(old);
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex d) const override { return exchangeDevice(d); }
  at::Device getDeviceFromPtr(void*) const override { return at::Device(kRbln, static_cast<c10::DeviceIndex>(g_current)); }
  bool isPinnedPtr(const void*) const override { return false; }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    resize_bytes(storage, newsize);
  }
};

// --- metadata kernels ---------------------------------------------------------------------------

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<at::ScalarType> dtype,
                               std::optional<at::Layout>, std::optional<at::Device> device,
                               std::optional<bool>, std::optional<at::MemoryFormat> memory_format) {
  c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_generic(size, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                         std::optional<at::Layout>, std::optional<at::Device> device, std::optional<bool>) {
  c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

at::Tensor& set_source_storage(at::Tensor& self, c10::Storage source) {
  int64_t n = static_cast<int64_t>(source.nbytes() / self.dtype().itemsize());
  return at::native::set_storage_cpu_(self, std::move(source), 0, {n}, {});
}

at::Tensor& set_source_tensor(at::Tensor& self, const at::Tensor& src) {
  return at::native::set_storage_cpu_(self, src.storage(), src.storage_offset(), src.sizes(), src.strides());
}

at::Tensor& set_empty(at::Tensor& self) {
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, &g_allocator, true);
  return at::native::set_storage_cpu_(self, std::move(storage), 0, {0}, {});
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<at::MemoryFormat> memory_format) {
  c10::DeviceGuard guard(self.device());
  return at::native::resize_(self, size, memory_format);
}

// --- bridges (CPython functions: no dispatcher round trip) ---------------------------------------

at::Tensor alias_with_storage(c10::Storage storage, const at::Tensor& like, c10::DispatchKey key) {
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(key), like.dtype());
  t.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  // Lazy conjugation/negation are bits on the tensor, not in its bytes: keep them.
  if (like.is_conj()) t._set_conj(true);
  if (like.is_neg()) t._set_neg(true);
  return t;
}

void release_storage(void* ctx) { delete static_cast<c10::Storage*>(ctx); }

// A CPU tensor over the same bytes as a device tensor (kernels read and write it in place).
at::Tensor as_cpu(const at::Tensor& t) {
  const c10::Storage& s = t.storage();
  c10::DataPtr ptr(const_cast<void*>(s.data()), new c10::Storage(s), &release_storage, c10::Device(c10::kCPU));
  // Resizable with the CPU allocator: an out= kernel that must grow its output gets fresh CPU
  // bytes, and the caller (torch_rbln._dispatch) resizes the device tensor to match.
  c10::Storage cpu(c10::Storage::use_byte_size_t(), s.nbytes(), std::move(ptr), c10::GetCPUAllocator(), true);
  return alias_with_storage(std::move(cpu), t, c10::DispatchKey::CPU);
}

// A device tensor that takes over a CPU tensor's bytes (a kernel's fresh result): no copy.
at::Tensor adopt(const at::Tensor& t, int device) {
  check_index(device);
  const c10::Storage& s = t.storage();
  int64_t nbytes = static_cast<int64_t>(s.nbytes());
  account(device, nbytes);
  c10::DataPtr ptr(const_cast<void*>(s.data()), new Block{nullptr, s, device, nbytes}, &free_block,
                   c10::Device(kRbln, static_cast<c10::DeviceIndex>(device)));
  c10::Storage dev(c10::Storage::use_byte_size_t(), s.nbytes(), std::move(ptr), &g_allocator, true);
  return alias_with_storage(std::move(dev), t, c10::DispatchKey::PrivateUse1);
}

// --- rounding to the device's 16-bit format -------------------------------------------------------
// Every float32 value an eager op leaves on the device is rounded to FP16 (or BF16). Through ATen
// that is a conversion to a temporary and a copy back (~2 us for 64x64, mostly op overhead); the
// F16C round trip of rebel's round16.c (compiled into this library: one rounder for the eager device
// and the compiled-model executor) does it in place in ~0.3 us, bit-identical (IEEE
// round-to-nearest-even, the same instructions ATen's own vectorized conversion uses).
const bool g_has_f16c = rbln_has_f16c() != 0;

// Round a float32 CPU tensor in place to values the 16-bit format holds; other dtypes untouched.
void round_to_16bit(const at::Tensor& t, bool bf16) {
  if (t.scalar_type() != at::kFloat || t.numel() == 0) return;
  if (!bf16 && g_has_f16c && t.is_contiguous()) {
    float* p = t.data_ptr<float>();
    at::parallel_for(0, t.numel(), 1 << 16, [p](int64_t b, int64_t e) { rbln_round_half(p + b, e - b); });
    return;
  }
  at::Tensor(t).copy_(t.to(bf16 ? at::kBFloat16 : at::kHalf));
}

PyObject* py_round(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* obj;
  int bf16;
  if (!PyArg_ParseTuple(args, "Op", &obj, &bf16)) return nullptr;
  round_to_16bit(THPVariable_Unpack(obj), bf16);
  Py_INCREF(obj);
  return obj;
  END_HANDLE_TH_ERRORS
}

PyObject* py_as_cpu(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  return THPVariable_Wrap(as_cpu(THPVariable_Unpack(arg)));
  END_HANDLE_TH_ERRORS
}

PyObject* py_adopt(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* obj;
  int device;
  if (!PyArg_ParseTuple(args, "Oi", &obj, &device)) return nullptr;
  return THPVariable_Wrap(adopt(THPVariable_Unpack(obj), device));
  END_HANDLE_TH_ERRORS
}

PyObject* py_configure(PyObject*, PyObject* args) {
  int count;
  if (!PyArg_ParseTuple(args, "i", &count)) return nullptr;
  if (count < 1 || count > kMaxDevices) {
    PyErr_SetString(PyExc_ValueError, "device count out of range");
    return nullptr;
  }
  g_device_count = count;
  static std::once_flag once;
  std::call_once(once, [] {
    c10::SetAllocator(kRbln, &g_allocator);
    at::RegisterPrivateUse1HooksInterface(new RblnHooks());
  });
  Py_RETURN_NONE;
}

PyObject* py_set_capacity(PyObject*, PyObject* args) {
  int d;
  long long cap;
  if (!PyArg_ParseTuple(args, "iL", &d, &cap)) return nullptr;
  if (d < 0 || d >= kMaxDevices) { PyErr_SetString(PyExc_ValueError, "bad device"); return nullptr; }
  g_capacity[d] = cap;
  Py_RETURN_NONE;
}

PyObject* py_stats(PyObject*, PyObject* args) {
  int d;
  if (!PyArg_ParseTuple(args, "i", &d)) return nullptr;
  if (d < 0 || d >= kMaxDevices) { PyErr_SetString(PyExc_ValueError, "bad device"); return nullptr; }
  return Py_BuildValue("(LLLLL)", (long long)g_allocated[d].load(), (long long)g_peak[d].load(),
                       (long long)g_count[d].load(), (long long)g_alloc_calls[d].load(),
                       (long long)g_capacity[d].load());
}

PyObject* py_reset_peak(PyObject*, PyObject* args) {
  int d;
  if (!PyArg_ParseTuple(args, "i", &d)) return nullptr;
  if (d < 0 || d >= kMaxDevices) { PyErr_SetString(PyExc_ValueError, "bad device"); return nullptr; }
  g_peak[d] = g_allocated[d].load();
  Py_RETURN_NONE;
}

PyObject* py_current(PyObject*, PyObject*) { return PyLong_FromLong(g_current); }

PyObject* py_set_current(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  long d = PyLong_AsLong(arg);
  if (d == -1 && PyErr_Occurred()) return nullptr;
  check_index(static_cast<int>(d));
  g_current = static_cast<int>(d);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"as_cpu", py_as_cpu, METH_O, "CPU alias of a device tensor's bytes"},
    {"adopt", py_adopt, METH_VARARGS, "device tensor owning a CPU tensor's bytes"},
    {"round_", py_round, METH_VARARGS, "round a float32 CPU tensor in place to FP16 (or BF16)"},
    {"configure", py_configure, METH_VARARGS, "set the device count; install allocator and hooks"},
    {"set_capacity", py_set_capacity, METH_VARARGS, "DRAM bytes of a device (0: unlimited)"},
    {"stats", py_stats, METH_VARARGS, "(allocated, peak, live blocks, allocations, capacity)"},
    {"reset_peak", py_reset_peak, METH_VARARGS, "peak := allocated"},
    {"current_device", py_current, METH_NOARGS, "this thread's current device"},
    {"set_device", py_set_current, METH_O, "set this thread's current device"},
    {nullptr, nullptr, 0, nullptr}};

// The module's name carries its build key (torch_rbln/_shim.py), so it comes from the build.
#define RBLN_STR2(x) #x
#define RBLN_STR(x) RBLN_STR2(x)
#define RBLN_CAT2(a, b) a##b
#define RBLN_CAT(a, b) RBLN_CAT2(a, b)
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, RBLN_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", TORCH_FN(empty_memory_format));
  m.impl("empty_strided", TORCH_FN(empty_strided));
  m.impl("view", TORCH_FN(at::native::view));
  m.impl("as_strided", TORCH_FN(at::native::as_strided_tensorimpl));
  m.impl("_reshape_alias", TORCH_FN(at::native::_reshape_alias));
  m.impl("unfold", TORCH_FN(at::native::unfold));
  m.impl("resize_", TORCH_FN(resize_));
  m.impl("set_.source_Storage", TORCH_FN(set_source_storage));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(at::native::set_storage_cpu_));
  m.impl("set_.source_Tensor", TORCH_FN(set_source_tensor));
  m.impl("set_", TORCH_FN(set_empty));
}

PyMODINIT_FUNC RBLN_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
