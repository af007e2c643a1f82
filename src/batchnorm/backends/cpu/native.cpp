// The compiled call path of the CPU backend (see native.py): a module's common call, from the
// tensor checks to the kernel, without Python in between, and the training step's backward as a
// C++ autograd node. The arithmetic is not here: the kernels are the Numba ones of kernels.py,
// called through the C functions that kernels.c_entry_points compiles, whose addresses
// native.py hands over once (set_entry_points).
//
// Every entry point either computes the whole call or declines it (returns None, having changed
// nothing), and the caller then takes the Python path, which answers every call. A call is
// taken only in the form the kernels read directly: float32 or float64, CPU, dense contiguous or
// channels_last input, every per-channel tensor a dense vector of its dtype and channel count.
// The caller (batchnorm.functional) has asked the questions only Python can answer: torch.compile,
// forward-mode AD, graph capture, eps and momentum.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <utility>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Vector = std::optional<Tensor>;

// The C functions of kernels.c_entry_points for values of type T (float32 or float64; the
// first argument, a value of that type, only selects it). The first three run a whole call;
// this file takes them for calls on one block only. A call on several blocks runs on torch's
// threads (see on_torch_threads) through the others, each of which computes one range of units
// (planes) or one block (rows) on the calling thread.
template <typename T>
struct Entries {
  int32_t (*train)(T like, int64_t batch, int64_t channels, int64_t size, int64_t planes,
                   int64_t x, int64_t weight, int64_t bias, double eps, int64_t act,
                   int64_t out, int64_t mean, int64_t var, int64_t running_mean,
                   int64_t running_var, double bessel, double momentum, int64_t tracked,
                   int64_t blocks) = nullptr;
  void (*eval)(T like, int64_t batch, int64_t channels, int64_t size, int64_t planes,
               int64_t x, int64_t mean, int64_t var, int64_t weight, int64_t bias, double eps,
               int64_t act, int64_t out, int64_t blocks) = nullptr;
  void (*backward)(T like, int64_t batch, int64_t channels, int64_t size, int64_t planes,
                   int64_t grad, int64_t x, int64_t mean, int64_t var, int64_t weight,
                   int64_t bias, double eps, int64_t act, int64_t need_input,
                   int64_t grad_input, int64_t grad_weight, int64_t grad_bias,
                   int64_t blocks) = nullptr;
  // planes: channels [first, stop) (eval: segments)
  void (*train_range)(T like, int64_t batch, int64_t channels, int64_t size, int64_t x,
                      int64_t weight, int64_t bias, double eps, int64_t act, int64_t out,
                      int64_t mean, int64_t var, int64_t first, int64_t stop) = nullptr;
  int32_t (*update)(T like, int64_t channels, int64_t mean, int64_t var, int64_t running_mean,
                    int64_t running_var, double bessel, double momentum,
                    int64_t tracked) = nullptr;
  void (*eval_range)(T like, int64_t batch, int64_t channels, int64_t size, int64_t x,
                     int64_t mean, int64_t var, int64_t weight, int64_t bias, double eps,
                     int64_t act, int64_t out, int64_t first, int64_t stop) = nullptr;
  void (*backward_range)(T like, int64_t batch, int64_t channels, int64_t size, int64_t grad,
                         int64_t x, int64_t mean, int64_t var, int64_t weight, int64_t bias,
                         double eps, int64_t act, int64_t need_input, int64_t grad_input,
                         int64_t grad_weight, int64_t grad_bias, int64_t first,
                         int64_t stop) = nullptr;
  // rows: block k of blocks; sums, float64 (2 * blocks, channels), carries the partial sums
  void (*rows_sums)(T like, int64_t rows, int64_t channels, int64_t x, int64_t sums, int64_t k,
                    int64_t blocks) = nullptr;
  void (*rows_train)(T like, int64_t rows, int64_t channels, int64_t x, int64_t weight,
                     int64_t bias, double eps, int64_t act, int64_t out, int64_t mean,
                     int64_t var, int64_t sums, int64_t k, int64_t blocks) = nullptr;
  void (*rows_eval)(T like, int64_t rows, int64_t channels, int64_t x, int64_t mean,
                    int64_t var, int64_t weight, int64_t bias, double eps, int64_t act,
                    int64_t out, int64_t k, int64_t blocks) = nullptr;
  void (*rows_grad_sums)(T like, int64_t rows, int64_t channels, int64_t grad, int64_t x,
                         int64_t mean, int64_t var, int64_t weight, int64_t bias, double eps,
                         int64_t act, int64_t sums, int64_t k, int64_t blocks) = nullptr;
  void (*rows_grad_input)(T like, int64_t rows, int64_t channels, int64_t grad, int64_t x,
                          int64_t mean, int64_t var, int64_t weight, int64_t bias, double eps,
                          int64_t act, int64_t need_input, int64_t grad_input,
                          int64_t grad_weight, int64_t grad_bias, int64_t sums, int64_t k,
                          int64_t blocks) = nullptr;
};

Entries<float> float32;
Entries<double> float64;
bool loaded = false;
int64_t serial_below = 0;  // below this many values a kernel runs on the calling thread
// the same for the backward on planes (as cpu's)
int64_t backward_planes_serial_below = 0;
int64_t pool_threads = 1;  // the most threads Numba's pool has
// The Python backward for what the kernel does not take (native.py's backward_fallback).
py::object* fallback = nullptr;

// Tensors without memory of their own to read (torch.func wrappers, the older vmap's batched
// tensors), subclasses that dispatch in Python, lazy views (negated, conjugated, zero).
const c10::DispatchKeySet opaque({
    c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::BatchedNestedTensor,
    c10::DispatchKey::Batched,
    c10::DispatchKey::Python,
    c10::DispatchKey::Functionalize,
    c10::DispatchKey::Conjugate,
    c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor,
});

// A torch.func transform is active (its dynamic layers put this key in the thread's set).
inline bool transforms_active() {
  return c10::impl::tls_is_dispatch_key_included(
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

inline bool plain(const Tensor& t) {
  return t.is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(opaque);
}

inline int64_t address(const Tensor& t) {
  return reinterpret_cast<int64_t>(t.data_ptr());
}

// An input's geometry as the kernels see it: (N, C, S) planes when contiguous with S > 1 values
// per plane, else (N * S, C) rows.
struct Geometry {
  int64_t batch = 0, channels = 0, size = 0, numel = 0;
  bool planes = false;
  bool single = true;  // float32 (else float64)
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

bool common_input(const Tensor& x, Geometry& g) {
  if (!loaded || !x.defined() || x.dim() < 2 || !plain(x)) {
    return false;
  }
  auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) {
    return false;
  }
  g.single = dtype == at::kFloat;
  if (!x.is_contiguous()) {
    if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      g.format = at::MemoryFormat::ChannelsLast;
    } else if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
      g.format = at::MemoryFormat::ChannelsLast3d;
    } else {
      return false;
    }
  }
  g.numel = x.numel();
  if (g.numel == 0) {
    return false;
  }
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.size = g.numel / (g.batch * g.channels);
  g.planes = g.format == at::MemoryFormat::Contiguous && g.size > 1;
  return true;
}

bool common_vector(const Vector& t, const Tensor& x) {
  return t.has_value() && t->defined() && t->scalar_type() == x.scalar_type() &&
         t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous() && plain(*t);
}

// One block per thread, at most one per unit of work; one below the grain size (as _run).
int64_t blocks(int64_t numel, int64_t units, int64_t below = serial_below) {
  if (numel < below) {
    return 1;
  }
  int64_t threads = std::min<int64_t>(at::get_num_threads(), pool_threads);
  return std::max<int64_t>(1, std::min(threads, units));
}

// A call on several blocks is launched by at::parallel_for on torch's intra-op threads (OpenMP:
// this file is compiled with -fopenmp and binds to the runtime torch loaded, as Numba's OpenMP
// layer does), with serial kernels for each thread's share, instead of a parallel Numba kernel
// launched by Numba (BENCHMARKS.md, "Since 6d11ea9", for what it changed). body(first, stop)
// runs on n ranges covering [0, units), one per thread.
template <typename Body>
void on_torch_threads(int64_t units, int64_t n, const Body& body) {
  at::parallel_for(0, units, (units + n - 1) / n, body);
}

// block(k) for each of n row blocks, one per thread.
template <typename Block>
void each_block(int64_t n, const Block& block) {
  on_torch_threads(n, n, [&](int64_t first, int64_t stop) {
    for (int64_t k = first; k < stop; ++k) block(k);
  });
}

// Rows on n blocks: every block's partial sums, then every block's rest (as the rows kernels'
// two parallel loops).
template <typename Sums, typename Rest>
void rows_in_two_passes(int64_t n, const Sums& sums, const Rest& rest) {
  each_block(n, sums);
  each_block(n, rest);
}

// f(entries, like) on the entry points of the input's dtype.
template <typename F>
auto by_dtype(const Geometry& g, const F& f) {
  return g.single ? f(float32, 0.0f) : f(float64, 0.0);
}

inline bool wants_grad(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || weight.requires_grad() || bias.requires_grad());
}

// Activations: the kernels fuse identity (0) and ReLU (1); silu (2) and gelu (3) are applied
// by torch's operators around them, in place on the kernel's output, and on the pre-activation
// recomputed from the input in the backward (as backends/smooth.py does on the Python path).
constexpr int64_t kSilu = 2, kGelu = 3;

inline int64_t kernel_act(int64_t act) {
  return act >= kSilu ? 0 : act;
}

void activate_in_place(Tensor& z, int64_t act) {
  if (act == kSilu) {
    at::silu_(z);
  } else if (act == kGelu) {
    at::gelu_(z);
  }
}

struct Running {
  Tensor mean, var;
  Vector tracked;
  double eps, momentum;
  int64_t act;
  bool finite = false;
};

// The training forward and the running-statistics update: (y, batch mean, biased variance).
std::tuple<Tensor, Tensor, Tensor> train_kernel(const Tensor& x, const Tensor& weight,
                                                const Tensor& bias, const Geometry& g,
                                                Running& r) {
  auto out = at::empty_like(x, g.format);
  auto mean = at::empty({g.channels}, x.options());
  auto var = at::empty({g.channels}, x.options());
  int64_t count = g.numel / g.channels;
  double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  int64_t tracked = r.tracked.has_value() ? address(*r.tracked) : 0;
  int64_t n = blocks(g.numel, g.planes ? g.channels : g.batch * g.size);
  int64_t act = kernel_act(r.act), rows = g.batch * g.size;
  int32_t finite = by_dtype(g, [&](auto& e, auto like) {
    if (n == 1) {
      return e.train(like, g.batch, g.channels, g.size, g.planes, address(x), address(weight),
                     address(bias), r.eps, act, address(out), address(mean), address(var),
                     address(r.mean), address(r.var), bessel, r.momentum, tracked, 1);
    }
    if (g.planes) {
      on_torch_threads(g.channels, n, [&](int64_t first, int64_t stop) {
        e.train_range(like, g.batch, g.channels, g.size, address(x), address(weight),
                      address(bias), r.eps, act, address(out), address(mean), address(var),
                      first, stop);
      });
    } else {
      auto sums = at::empty({2 * n, g.channels}, x.options().dtype(at::kDouble));
      rows_in_two_passes(
          n,
          [&](int64_t k) { e.rows_sums(like, rows, g.channels, address(x), address(sums), k, n); },
          [&](int64_t k) {
            e.rows_train(like, rows, g.channels, address(x), address(weight), address(bias),
                         r.eps, act, address(out), address(mean), address(var), address(sums),
                         k, n);
          });
    }
    return e.update(like, g.channels, address(mean), address(var), address(r.mean),
                    address(r.var), bessel, r.momentum, tracked);
  });
  r.finite = finite != 0;
  activate_in_place(out, r.act);
  // the in-place writes, recorded as torch's in-place operations record theirs
  torch::autograd::impl::bump_version(r.mean);
  torch::autograd::impl::bump_version(r.var);
  if (r.finite && r.tracked.has_value()) {
    torch::autograd::impl::bump_version(*r.tracked);
  }
  return {out, mean, var};
}

// The inference kernel: out = BN(x) with the given statistics, then the activation.
void eval_kernel(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& weight,
                 const Tensor& bias, double eps, int64_t act, const Geometry& g, Tensor& out) {
  int64_t n = blocks(g.numel, g.planes ? g.batch * g.channels : g.batch * g.size);
  int64_t fused = kernel_act(act), rows = g.batch * g.size;
  by_dtype(g, [&](auto& e, auto like) {
    if (n == 1) {
      e.eval(like, g.batch, g.channels, g.size, g.planes, address(x), address(mean),
             address(var), address(weight), address(bias), eps, fused, address(out), 1);
    } else if (g.planes) {
      on_torch_threads(g.batch * g.channels, n, [&](int64_t first, int64_t stop) {
        e.eval_range(like, g.batch, g.channels, g.size, address(x), address(mean),
                     address(var), address(weight), address(bias), eps, fused, address(out),
                     first, stop);
      });
    } else {
      each_block(n, [&](int64_t k) {
        e.rows_eval(like, rows, g.channels, address(x), address(mean), address(var),
                    address(weight), address(bias), eps, fused, address(out), k, n);
      });
    }
  });
  activate_in_place(out, act);
}

// The gradients of a common training step, or false where the kernel does not take the call
// (a double backward, a batched or opaque gradient, a transform active, a gradient the layout
// cannot conform): then the Python fallback answers.
bool backward_kernel(Tensor grad, const Tensor& x, const Tensor& mean, const Tensor& var,
                     const Tensor& weight, const Tensor& bias, double eps, int64_t act,
                     bool need_input, variable_list& grads) {
  Geometry g;
  if (at::GradMode::is_enabled() || transforms_active() ||
      grad.scalar_type() != x.scalar_type() || !plain(grad) || !common_input(x, g)) {
    return false;
  }
  if (!(grad.sizes() == x.sizes() && grad.strides() == x.strides())) {
    grad = grad.contiguous(g.format);
    if (grad.strides() != x.strides()) {
      return false;
    }
  }
  if (act >= kSilu) {
    // g f'(z) into the pre-activation z, recomputed from the input with the batch statistics
    auto z = at::empty_like(x, g.format);
    eval_kernel(x, mean, var, weight, bias, eps, 0, g, z);
    if (act == kSilu) {
      at::silu_backward_out(z, grad, z);
    } else {
      at::gelu_backward_out(z, grad, z);
    }
    grad = z;
    act = 0;
  }
  auto grad_input = need_input ? at::empty_like(x, g.format) : Tensor();
  auto grad_weight = at::empty({g.channels}, x.options());
  auto grad_bias = at::empty({g.channels}, x.options());
  int64_t into = need_input ? address(grad_input) : address(x);  // (not written then)
  int64_t n = blocks(g.numel, g.planes ? g.channels : g.batch * g.size,
                     g.planes ? backward_planes_serial_below : serial_below);
  int64_t rows = g.batch * g.size;
  by_dtype(g, [&](auto& e, auto like) {
    if (n == 1) {
      e.backward(like, g.batch, g.channels, g.size, g.planes, address(grad), address(x),
                 address(mean), address(var), address(weight), address(bias), eps, act,
                 need_input, into, address(grad_weight), address(grad_bias), 1);
    } else if (g.planes) {
      on_torch_threads(g.channels, n, [&](int64_t first, int64_t stop) {
        e.backward_range(like, g.batch, g.channels, g.size, address(grad), address(x),
                         address(mean), address(var), address(weight), address(bias), eps, act,
                         need_input, into, address(grad_weight), address(grad_bias), first,
                         stop);
      });
    } else {
      auto sums = at::empty({2 * n, g.channels}, x.options().dtype(at::kDouble));
      rows_in_two_passes(
          n,
          [&](int64_t k) {
            e.rows_grad_sums(like, rows, g.channels, address(grad), address(x), address(mean),
                             address(var), address(weight), address(bias), eps, act,
                             address(sums), k, n);
          },
          [&](int64_t k) {
            e.rows_grad_input(like, rows, g.channels, address(grad), address(x), address(mean),
                              address(var), address(weight), address(bias), eps, act,
                              need_input, into, address(grad_weight), address(grad_bias),
                              address(sums), k, n);
          });
    }
  });
  grads = {grad_input, grad_weight, grad_bias};
  return true;
}

// The common training step that needs gradients, as one autograd node.
struct CommonStep : public torch::autograd::Function<CommonStep> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const Tensor& bias, const Geometry* g, Running* running) {
    auto [out, mean, var] = train_kernel(x, weight, bias, *g, *running);
    ctx->save_for_backward({x, weight, bias, mean, var});
    ctx->saved_data["eps"] = running->eps;
    ctx->saved_data["act"] = running->act;
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad = grad_outputs[0];
    if (!grad.defined()) {  // no gradient reached the output
      return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    double eps = ctx->saved_data["eps"].toDouble();
    int64_t act = ctx->saved_data["act"].toInt();
    bool needs[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                     ctx->needs_input_grad(2)};
    variable_list grads;
    if (!backward_kernel(grad, x, saved[3], saved[4], weight, bias, eps, act, needs[0], grads)) {
      py::gil_scoped_acquire gil;
      auto answer = (*fallback)(grad, x, weight, bias, saved[3], saved[4], eps, act,
                                py::make_tuple(needs[0], needs[1], needs[2]));
      auto computed = answer.cast<std::tuple<Vector, Vector, Vector>>();
      grads = {std::get<0>(computed).value_or(Tensor()), std::get<1>(computed).value_or(Tensor()),
               std::get<2>(computed).value_or(Tensor())};
    }
    for (int i = 0; i < 3; ++i) {
      if (!needs[i]) {
        grads[i] = Tensor();
      }
    }
    return {grads[0], grads[1], grads[2], Tensor(), Tensor()};
  }
};

// A module's common training call: (y, finite) with the running statistics (and the count of
// batches, when finite) updated in place, or None.
py::object train(const Tensor& x, const Vector& weight, const Vector& bias,
                 const Tensor& running_mean, const Tensor& running_var, const Vector& tracked,
                 double eps, double momentum, int64_t act) {
  Geometry g;
  if (!common_input(x, g) || g.numel / g.channels < 2 || !common_vector(weight, x) ||
      !common_vector(bias, x) || !common_vector(running_mean, x) ||
      !common_vector(running_var, x) || running_mean.requires_grad() ||
      running_var.requires_grad() || running_mean.is_inference() ||
      running_var.is_inference()) {
    // (inference tensors: the Python path's checks refuse their update outside inference mode
    // before anything is written)
    return py::none();
  }
  if (tracked.has_value() &&
      !(tracked->defined() && tracked->scalar_type() == at::kLong && tracked->numel() == 1 &&
        plain(*tracked) && !tracked->is_inference())) {
    return py::none();
  }
  Running running{running_mean, running_var, tracked, eps, momentum, act};
  Tensor out;
  if (wants_grad(x, *weight, *bias)) {
    out = CommonStep::apply(x, *weight, *bias, &g, &running);
  } else {
    out = std::get<0>(train_kernel(x, *weight, *bias, g, running));
  }
  return py::make_tuple(out, running.finite);
}

// A module's common inference call (no gradient wanted): y, or None.
py::object eval(const Tensor& x, const Tensor& mean, const Tensor& var, const Vector& weight,
                const Vector& bias, double eps, int64_t act) {
  Geometry g;
  if (!common_input(x, g) || !common_vector(weight, x) || !common_vector(bias, x) ||
      !common_vector(mean, x) || !common_vector(var, x) || wants_grad(x, *weight, *bias)) {
    return py::none();
  }
  auto out = at::empty_like(x, g.format);
  eval_kernel(x, mean, var, *weight, *bias, eps, act, g, out);
  return py::cast(out);
}

template <typename T>
void set(Entries<T>& entries, const std::vector<int64_t>& addresses) {
  TORCH_CHECK(addresses.size() == 12,
              "batchnorm native: expected 12 entry points per dtype, got ", addresses.size());
  auto take = [&](auto& field, size_t i) {
    field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(addresses[i]);
  };
  take(entries.train, 0);
  take(entries.eval, 1);
  take(entries.backward, 2);
  take(entries.train_range, 3);
  take(entries.update, 4);
  take(entries.eval_range, 5);
  take(entries.backward_range, 6);
  take(entries.rows_sums, 7);
  take(entries.rows_train, 8);
  take(entries.rows_eval, 9);
  take(entries.rows_grad_sums, 10);
  take(entries.rows_grad_input, 11);
}

// The addresses of the C functions (the twelve of Entries, in its order) for float32 and for
// float64, once.
void set_entry_points(const std::vector<int64_t>& single, const std::vector<int64_t>& double_,
                      int64_t serial, int64_t backward_planes_serial, int64_t threads,
                      py::object backward_fallback) {
  TORCH_CHECK(!loaded, "batchnorm native: the entry points are set once");
  set(float32, single);
  set(float64, double_);
  serial_below = serial;
  backward_planes_serial_below = backward_planes_serial;
  pool_threads = threads;
  // kept for the life of the process (autograd may call it from any thread)
  fallback = new py::object(std::move(backward_fallback));
  loaded = true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_entry_points", &set_entry_points);
  // The backward's cut on planes changed after loading, for timing two cuts side by side in
  // one process (scripts/backward_threshold.py); answers the cut it replaces.
  m.def("set_backward_planes_serial_below", [](int64_t below) {
    return std::exchange(backward_planes_serial_below, below);
  });
  m.def("train", &train);
  m.def("eval", &eval);
  // How many of torch's threads a parallel call on n blocks runs on (for the tests: 1 where
  // this file was built without OpenMP, or where its runtime is not torch's, whose thread count
  // torch.set_num_threads sets).
  m.def("threads_of_a_call", [](int64_t n) {
    std::atomic<int64_t> mask{0};
    each_block(n, [&](int64_t) { mask |= int64_t{1} << std::min(omp_get_thread_num(), 63); });
    return __builtin_popcountll(mask.load());
  });
}
