// hcustom_mc._bucket_index: the C++ builder of the bucketed batch index (see hcustom_mc/data/sampler.py).
//
// The Python fallback in sampler.py implements the same algorithm step for step; the two must give
// identical arrays, so any change here needs the same change there (and a new ALGORITHM tag, which
// makes the wrapper refuse a stale build instead of silently producing different batches).
//
// Algorithm (all arithmetic modulo 2**64):
//   mix64(z)            splitmix64 finaliser
//   key(a, b, c, d)     h = KEY_INIT; for x in (a, b, c, d): h = mix64((h ^ x) + GOLDEN)
//   stream(key)         splitmix64: state = key; next() = mix64(state += GOLDEN)
//   below(n)            unbiased integer in [0, n): reject draws r < (2**64 mod n), return r % n
//   shuffle(a, key)     Fisher-Yates: for i = len-1 .. 1: swap(a[i], a[below(i + 1)])
//   index               members of each group (ascending index, groups in ascending id order)
//                       shuffled with key(seed, epoch, TAG_GROUP, id), cut into full batches
//                       (drop_last) or topped up cyclically from the group's own shuffled members;
//                       then the batch order is shuffled with key(seed, epoch, TAG_ORDER, 0).
// Plain CPython C API, so building it needs nothing but a C++17 compiler.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <numeric>
#include <utility>
#include <vector>

namespace {

constexpr const char* kAlgorithm = "splitmix64-fisher-yates-v1";
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kKeyInit = 0x6863757374626B74ULL;  // "hcustbkt"
constexpr uint64_t kTagGroup = 1;
constexpr uint64_t kTagOrder = 2;

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t derive_key(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  uint64_t h = kKeyInit;
  for (uint64_t x : {a, b, c, d}) h = mix64((h ^ x) + kGolden);
  return h;
}

class Stream {
 public:
  explicit Stream(uint64_t key) : state_(key) {}
  uint64_t next() { return mix64(state_ += kGolden); }
  // Modulo with rejection of the short low range: every residue gets exactly floor(2**64 / n) draws.
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;  // == 2**64 mod n
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }

 private:
  uint64_t state_;
};

template <typename T>
void shuffle(std::vector<T>& a, uint64_t key) {
  Stream s(key);
  for (size_t i = a.size(); i > 1; --i) std::swap(a[i - 1], a[s.below(i)]);
}

// Does the real work without the GIL; returns false (with `error` set) on input it cannot handle.
bool build(const std::vector<int64_t>& gid, int64_t batch, uint64_t seed, uint64_t epoch, bool drop_last,
           std::vector<int64_t>& out, const char** error) {
  const size_t n = gid.size();
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Stable: members of a group stay in ascending index order before their shuffle.
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return gid[x] < gid[y]; });

  // All batches in group order, flat; the batch order is shuffled afterwards as a permutation of
  // batch numbers (the same swaps as shuffling the batches themselves, without moving rows around).
  const size_t B = static_cast<size_t>(batch);
  std::vector<int64_t> grouped;
  std::vector<int64_t> members;
  for (size_t start = 0; start < n;) {
    const int64_t g = gid[order[start]];
    size_t end = start;
    while (end < n && gid[order[end]] == g) ++end;
    members.assign(order.begin() + start, order.begin() + end);
    shuffle(members, derive_key(seed, epoch, kTagGroup, static_cast<uint64_t>(g)));
    const size_t m = members.size();
    const size_t nb = drop_last ? m / B : (m + B - 1) / B;
    if (nb > (SIZE_MAX / sizeof(int64_t) - grouped.size()) / B) {
      *error = "batch index too large for memory";
      return false;
    }
    for (size_t k = 0; k < nb * B; ++k) grouped.push_back(members[k % m]);  // k % m: top-up wraps around
    start = end;
  }
  std::vector<int64_t> perm(grouped.size() / B);
  std::iota(perm.begin(), perm.end(), 0);
  shuffle(perm, derive_key(seed, epoch, kTagOrder, 0));
  out.resize(grouped.size());
  for (size_t b = 0; b < perm.size(); ++b)
    std::copy_n(grouped.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(perm[b]) * B), B,
                out.begin() + static_cast<std::ptrdiff_t>(b * B));
  return true;
}

// A 1-D C-contiguous buffer of 8-byte signed integers (numpy int64) is read directly; anything else
// goes through the sequence protocol (lists, other dtypes via __index__).
bool read_group_ids(PyObject* obj, std::vector<int64_t>& gid) {
  if (PyObject_CheckBuffer(obj)) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
      const char* f = view.format ? view.format : "B";
      if (*f == '@' || *f == '=' || *f == '<') ++f;
      const bool int64 = view.itemsize == 8 && view.ndim <= 1 && (!std::strcmp(f, "q") || !std::strcmp(f, "l"));
      if (int64) {
        gid.resize(static_cast<size_t>(view.len / 8));
        if (!gid.empty()) std::memcpy(gid.data(), view.buf, gid.size() * 8);
        PyBuffer_Release(&view);
        return true;
      }
      PyBuffer_Release(&view);
    } else {
      PyErr_Clear();  // e.g. a non-contiguous view: the sequence path still works
    }
  }
  PyObject* seq = PySequence_Fast(obj, "group_ids must be a sequence or buffer of integers");
  if (!seq) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  gid.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(items[i]);
    if (v == -1 && PyErr_Occurred()) {
      Py_DECREF(seq);
      return false;
    }
    gid[static_cast<size_t>(i)] = v;
  }
  Py_DECREF(seq);
  return true;
}

PyObject* py_build_batch_index(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"group_ids", "global_batch", "seed", "epoch", "drop_last", nullptr};
  PyObject *ids_obj, *seed_obj, *epoch_obj;
  Py_ssize_t batch;
  int drop_last = 1;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OnOO|p", const_cast<char**>(kwlist), &ids_obj, &batch,
                                   &seed_obj, &epoch_obj, &drop_last))
    return nullptr;
  if (batch < 1) {
    PyErr_Format(PyExc_ValueError, "global_batch must be >= 1, got %zd", batch);
    return nullptr;
  }
  // The seed is taken modulo 2**64 (two's complement for negatives), exactly like `seed & MASK` in Python.
  const uint64_t seed = PyLong_AsUnsignedLongLongMask(seed_obj);
  if (PyErr_Occurred()) return nullptr;
  const long long epoch = PyLong_AsLongLong(epoch_obj);
  if (epoch == -1 && PyErr_Occurred()) return nullptr;
  if (epoch < 0) {
    PyErr_Format(PyExc_ValueError, "epoch must be >= 0, got %lld", epoch);
    return nullptr;
  }
  std::vector<int64_t> gid;
  if (!read_group_ids(ids_obj, gid)) return nullptr;

  std::vector<int64_t> out;
  const char* error = nullptr;
  bool ok;
  Py_BEGIN_ALLOW_THREADS;
  try {  // no C++ exception may cross into the interpreter
    ok = build(gid, batch, seed, static_cast<uint64_t>(epoch), drop_last != 0, out, &error);
  } catch (const std::bad_alloc&) {
    ok = false;
    error = "out of memory building the batch index";
  }
  Py_END_ALLOW_THREADS;
  if (!ok) {
    PyErr_SetString(PyExc_MemoryError, error);
    return nullptr;
  }
  // Native-endian int64 bytes, row-major [num_batches, global_batch]; the wrapper reshapes.
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}

PyMethodDef kMethods[] = {
    {"build_batch_index", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_build_batch_index)),
     METH_VARARGS | METH_KEYWORDS,
     "build_batch_index(group_ids, global_batch, seed, epoch, drop_last=True) -> bytes\n\n"
     "Native int64 bytes of the [num_batches, global_batch] index; see hcustom_mc.data.sampler."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_bucket_index",
                       "C++ builder of the bucketed batch index (hcustom_mc.data.sampler).", -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__bucket_index(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m && PyModule_AddStringConstant(m, "ALGORITHM", kAlgorithm) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
