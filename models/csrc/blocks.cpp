// The blocks of a frozen (BN-folded) ResNet, run from C++: no Python between the ops.
//
// At batch 1 a CIFAR block's two convs take ~150 us and every op called from Python costs
// 3-10 us of argument parsing and dispatch; the gated path adds gates (pool, matrix-vector
// product, clamp) and decisions to every block, skipped or not. Here each op costs the
// dispatcher only, and the gates of small blocks are one fused loop. `models/native.py`
// builds and loads this file; the Python paths in `models/resnet.py` and `models/lcnet.py`
// are the reference it is tested against, and what runs when it cannot be built.
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

using torch::Tensor;

// Large weights run on oneDNN whatever the input size (models/resnet.py ONEDNN_MIN_WEIGHT:
// torch's heuristic sends one small image to its im2col convolution, 2x slower here for
// ResNet-50's cut last-stage convs).
constexpr int64_t kOneDnnMinWeight = 1 << 16;

struct Conv {
  Tensor weight, bias;  // undefined weight: no such conv
  int64_t stride = 1, padding = 0;

  bool present() const { return weight.defined(); }
  Tensor operator()(const Tensor& x) const {
    if (weight.numel() >= kOneDnnMinWeight && x.device().is_cpu() &&
        x.scalar_type() == at::kFloat && at::hasMKLDNN()) {
      return at::mkldnn_convolution(x, weight, bias, {padding, padding}, {stride, stride},
                                    {1, 1}, 1);
    }
    return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
  }
};

// One residual block. Plain: identity = downsample(x) or x; out = relu(identity + F(x)),
// F = conv2(relu(conv1(x))) [then conv3(relu(.)) for a bottleneck]. A block without conv1
// is a skipped one (a static cut's): relu(downsample(x)) or x. `gather` (parallel
// placement in a static cut) keeps those outputs of conv1. Gated: `gate_weight`
// (1 + C_mid, C_in) and `gate_bias` give S_L then S_C from the pooled input.
struct Block {
  Conv conv1, conv2, conv3, downsample;
  Tensor gather, gate_weight, gate_bias;
  int64_t mid_channels = 0;
};

Tensor shortcut(const Block& b, const Tensor& x) {
  return b.downsample.present() ? b.downsample(x).relu_() : x;
}

Tensor tail(const Block& b, Tensor out) {
  out = b.conv2(out);
  return b.conv3.present() ? b.conv3(out.relu_()) : out;
}

// Gates of one image: clamp(W · mean_hw(x) + b, 0, 1), (1, 1 + C_mid). Small blocks
// (CIFAR widths) pool and multiply in one loop over a channels-last input; others call
// the library's reduction and matrix product, which use every core.
constexpr int64_t kFusedMaxInput = 1 << 16;   // C_in·H·W
constexpr int64_t kFusedMaxWeight = 1 << 16;  // (1 + C_mid)·C_in
constexpr int64_t kFusedMaxChannels = 1024;

// Pooling and product compiled for AVX-512, AVX2 and the baseline; the loader picks the
// widest this CPU has (one build serves any x86-64 machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DYNVIZ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DYNVIZ_VECTOR_CLONES
#endif

DYNVIZ_VECTOR_CLONES
void pool_and_project(const float* __restrict in, int64_t hw, int64_t c_in,
                      const float* __restrict w, const float* __restrict bias, int64_t outs,
                      float scale, float* __restrict out) {
  float pooled[kFusedMaxChannels];
  std::fill(pooled, pooled + c_in, 0.0f);
  for (int64_t p = 0; p < hw; ++p) {  // channels-last: position p's C_in values are adjacent
    const float* __restrict row = in + p * c_in;
#pragma omp simd
    for (int64_t c = 0; c < c_in; ++c) pooled[c] += row[c];
  }
  for (int64_t o = 0; o < outs; ++o) {
    float acc = 0.0f;
    const float* __restrict w_row = w + o * c_in;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < c_in; ++c) acc += w_row[c] * pooled[c];
    out[o] = std::clamp(acc * scale + bias[o], 0.0f, 1.0f);
  }
}

bool fuses_gates(const Block& b, const Tensor& x) {
  const int64_t c_in = x.size(1), hw = x.size(2) * x.size(3), outs = b.gate_weight.size(0);
  return x.scalar_type() == at::kFloat && x.device().is_cpu() &&
         b.gate_weight.scalar_type() == at::kFloat &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && c_in <= kFusedMaxChannels &&
         c_in * hw <= kFusedMaxInput && outs * c_in <= kFusedMaxWeight;
}

Tensor gates(const Block& b, const Tensor& x) {
  const int64_t c_in = x.size(1), hw = x.size(2) * x.size(3), outs = b.gate_weight.size(0);
  const float scale = 1.0f / static_cast<float>(hw);
  if (!fuses_gates(b, x)) {
    return at::addmm(b.gate_bias, x.sum({2, 3}), b.gate_weight.t(), 1.0, scale).clamp_(0, 1);
  }
  Tensor scores = at::empty({1, outs}, x.options().memory_format(at::MemoryFormat::Contiguous));
  pool_and_project(x.data_ptr<float>(), hw, c_in, b.gate_weight.data_ptr<float>(),
                   b.gate_bias.data_ptr<float>(), outs, scale, scores.data_ptr<float>());
  return scores;
}

class Blocks {
 public:
  // Per block: tensors (conv1 w, b, conv2 w, b, conv3 w, b, downsample w, b, gather,
  // gate weight, gate bias; an empty tensor where there is none) and ints (stride and
  // padding of conv1, conv2, conv3, downsample; C_mid).
  Blocks(const std::vector<std::vector<Tensor>>& tensors,
         const std::vector<std::vector<int64_t>>& ints) {
    TORCH_CHECK(tensors.size() == ints.size(), "one tensor list and one int list per block");
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const auto& n = ints[i];
      TORCH_CHECK(t.size() == 11 && n.size() == 9, "block ", i, ": 11 tensors and 9 ints");
      auto conv = [&](int k) {
        Conv c;
        if (t[2 * k].numel() > 0) {
          c.weight = t[2 * k];
          if (t[2 * k + 1].numel() > 0) c.bias = t[2 * k + 1];
        }
        c.stride = n[2 * k];
        c.padding = n[2 * k + 1];
        return c;
      };
      Block b{conv(0), conv(1), conv(2), conv(3)};
      if (t[8].numel() > 0) b.gather = t[8];
      if (t[9].numel() > 0) {
        b.gate_weight = t[9].contiguous();
        b.gate_bias = t[10].contiguous();
      }
      b.mid_channels = n[8];
      blocks_.push_back(std::move(b));
    }
  }

  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

  // Block i's gates on x, (1, 1 + C_mid), and whether the fused loop computed them.
  std::tuple<Tensor, bool> block_gates(const Tensor& x, int64_t i) const {
    check_range(i, i + 1);
    const Block& b = blocks_[i];
    TORCH_CHECK(b.gate_weight.defined(), "block ", i, " has no gates");
    return {gates(b, x), fuses_gates(b, x)};
  }

  // Blocks [start, stop) of a plain network on x, which is left as it is.
  Tensor plain(Tensor x, int64_t start, int64_t stop) const {
    check_range(start, stop);
    for (int64_t i = start; i < stop; ++i) {
      const Block& b = blocks_[i];
      if (!b.conv1.present()) {
        x = shortcut(b, x);
        continue;
      }
      Tensor identity = b.downsample.present() ? b.downsample(x) : x;
      Tensor out = b.conv1(x).relu_();
      if (b.gather.defined()) out = out.index_select(1, b.gather);
      x = tail(b, out).add_(identity).relu_();
    }
    return x;
  }

  // The gated sparse path for one image over blocks [start, stop): each block's gates,
  // then its shortcut alone when S_L = 0, else its branch on every channel, multiplied by
  // S_C unless all of them are 1. Stops before running a block where computing only its
  // active channels may pay (#active < C_mid and <= slice_below[i]·C_mid, the Python
  // path's test), so that Python slices it. Returns the features (x itself may have been
  // overwritten), the scores (1, 1 + C_mid) of every block it gated, and the block where it
  // stopped (`stop` when it ran them all).
  std::tuple<Tensor, std::vector<Tensor>, int64_t> gated(
      Tensor x, int64_t start, int64_t stop, const std::vector<double>& slice_below) const {
    check_range(start, stop);
    TORCH_CHECK(x.size(0) == 1, "the native gated path runs one image at a time");
    TORCH_CHECK(static_cast<int64_t>(slice_below.size()) == size(), "one limit per block");
    std::vector<Tensor> scores;
    for (int64_t i = start; i < stop; ++i) {
      const Block& b = blocks_[i];
      TORCH_CHECK(b.gate_weight.defined(), "block ", i, " has no gates");
      Tensor s = gates(b, x);
      scores.push_back(s);
      const Tensor s_cpu = s.device().is_cpu() ? s : s.cpu();
      const float* row = s_cpu.data_ptr<float>();
      const float s_l = row[0];
      if (s_l == 0.0f) {
        x = shortcut(b, x);
        continue;
      }
      const int64_t c = b.mid_channels;
      int64_t n_off = 0, n_unit = 0;
      for (int64_t k = 1; k <= c; ++k) {
        n_off += row[k] == 0.0f;
        n_unit += row[k] == 1.0f;
      }
      const int64_t n_on = c - n_off;
      if (n_on < c && static_cast<double>(n_on) <= slice_below[i] * c) {
        return {x, scores, i};
      }
      Tensor identity = b.downsample.present() ? b.downsample(x) : x;
      Tensor out = b.conv1(x).relu_();
      if (n_unit != c) out.mul_(s.narrow(1, 1, c).view({1, c, 1, 1}));
      out = tail(b, out);
      out = s_l == 1.0f ? out.add_(identity) : at::add_out(out, identity, out, s_l);
      x = out.relu_();
    }
    return {x, scores, stop};
  }

 private:
  void check_range(int64_t start, int64_t stop) const {
    TORCH_CHECK(0 <= start && start <= stop && stop <= size(), "blocks [", start, ", ", stop,
                ") out of range for ", size(), " blocks");
  }

  std::vector<Block> blocks_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<Blocks>(m, "Blocks")
      .def(py::init<const std::vector<std::vector<Tensor>>&,
                    const std::vector<std::vector<int64_t>>&>())
      .def("__len__", &Blocks::size)
      .def("block_gates", &Blocks::block_gates)
      .def("plain", &Blocks::plain, py::call_guard<py::gil_scoped_release>())
      .def("gated", &Blocks::gated, py::call_guard<py::gil_scoped_release>());
}
