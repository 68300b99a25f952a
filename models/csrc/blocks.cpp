// The blocks of a folded (BN-folded) ResNet, run from C++: no Python between the ops.
//
// At batch 1 a CIFAR block's two convs take ~150 us and every op called from Python costs
// 3-10 us of argument parsing and dispatch; the gated path adds gates (pool, matrix-vector
// product, clamp) and decisions to every block, skipped or not. Here each op costs the
// dispatcher only, and the gates of small blocks are one fused loop. In batches the gated
// path moves memory the dense network does not (a block's sub-batch gathered, its outputs
// merged back, every image pooled for the next gates); one loop per image merges an output
// back and pools it. Where computing only a block's active channels pays, the runner runs
// its convs sliced to them, keeping the slices of recurring channel sets.
// `dynviz/runtime/native.py` builds and loads this file; the Python paths of the folded
// blocks (`dynviz/runtime/folded.py`, `dynviz/runtime/sparse.py`) are the reference it is
// tested against, and what runs when it cannot be built.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

using torch::Tensor;

// Large weights run on oneDNN whatever the input size (dynviz/runtime/folded.py
// ONEDNN_MIN_WEIGHT: torch's heuristic sends one small image to its im2col convolution,
// slower for ResNet-50's sliced last-stage convs: docs/benchmarks.md).
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
// (1 + C_mid, C_in) and `gate_bias` give S_L then S_C from the pooled input; `sequential`
// placement scores the block input before conv1 (parallel: beside it).
struct Block {
  Conv conv1, conv2, conv3, downsample;
  Tensor gather, gate_weight, gate_bias;
  int64_t mid_channels = 0;
  bool sequential = true;
};

Tensor shortcut(const Block& b, const Tensor& x) {
  return b.downsample.present() ? b.downsample(x).relu_() : x;
}

Tensor tail(const Block& b, Tensor out) {
  out = b.conv2(out);
  return b.conv3.present() ? b.conv3(out.relu_()) : out;
}

int64_t conv_out(const Conv& conv, int64_t size, int64_t kernel) {
  return (size + 2 * conv.padding - kernel) / conv.stride + 1;
}

// A gated block's residual branch on x: every channel computed and multiplied by `s_c`
// (n, C_mid; undefined: all 1), or, `no_channels` (every S_C = 0), none computed: conv2
// then sees only zeros, and its output is its bias (as in the Python path).
Tensor gated_branch(const Block& b, const Tensor& x, const Tensor& s_c, bool no_channels) {
  if (!no_channels) {
    Tensor out = b.conv1(x).relu_();
    if (s_c.defined()) out.mul_(s_c.view({x.size(0), b.mid_channels, 1, 1}));
    return tail(b, out);
  }
  const Tensor& w1 = b.conv1.weight;
  const Tensor& w2 = b.conv2.weight;
  const int64_t h = conv_out(b.conv2, conv_out(b.conv1, x.size(2), w1.size(2)), w2.size(2));
  const int64_t w = conv_out(b.conv2, conv_out(b.conv1, x.size(3), w1.size(3)), w2.size(3));
  Tensor out = at::zeros({x.size(0), w2.size(0), h, w},
                         x.options().memory_format(x.suggest_memory_format()));
  if (b.conv2.bias.defined()) out.add_(b.conv2.bias.view({1, -1, 1, 1}));
  return b.conv3.present() ? b.conv3(out.relu_()) : out;
}

// A gated block cut to a set of its C_mid channels: conv1 cut to those outputs (sequential
// placement; parallel computes all of them beside the gates) and conv2 to those inputs.
struct Cut {
  int64_t block = 0;
  Tensor channels;  // (n,) ascending
  Conv conv1, conv2;
  int64_t nbytes = 0;
};

// w's slices `channels` along `dim`, in w's layout (as models/resnet.py's `_slice`).
Tensor slice_weight(const Tensor& w, int64_t dim, const Tensor& channels) {
  Tensor cut = w.index_select(dim, channels);
  return w.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? cut.contiguous(at::MemoryFormat::ChannelsLast) : cut;
}

int64_t bytes_of(const Conv& conv) {
  if (!conv.present()) return 0;
  const int64_t bias = conv.bias.defined() ? conv.bias.nbytes() : 0;
  return static_cast<int64_t>(conv.weight.nbytes()) + bias;
}

// Block `index` cut to the channels `on` marks (one flag per channel of C_mid).
Cut make_cut(const Block& b, int64_t index, const std::vector<char>& on) {
  std::vector<int64_t> kept;
  for (int64_t k = 0; k < static_cast<int64_t>(on.size()); ++k) {
    if (on[k]) kept.push_back(k);
  }
  Cut cut;
  cut.block = index;
  cut.channels = at::tensor(kept, b.conv2.weight.options().dtype(at::kLong));
  if (b.sequential) {
    cut.conv1 = b.conv1;
    cut.conv1.weight = slice_weight(b.conv1.weight, 0, cut.channels);
    if (b.conv1.bias.defined()) cut.conv1.bias = b.conv1.bias.index_select(0, cut.channels);
  }
  cut.conv2 = b.conv2;
  cut.conv2.weight = slice_weight(b.conv2.weight, 1, cut.channels);
  cut.nbytes = bytes_of(cut.conv1) + bytes_of(cut.conv2);
  return cut;
}

// The residual branch on x computing only the cut's channels, exact when every other
// channel's S_C is 0: their conv1 outputs (the cut conv1, or all of conv1's gathered),
// multiplied by `s_c` (n, C_mid; undefined: all 1), into the cut conv2.
Tensor sliced_branch(const Block& b, const Tensor& x, const Tensor& s_c, const Cut& cut) {
  Tensor out = b.sequential ? cut.conv1(x)
                            : b.conv1(x).index_select(1, cut.channels).contiguous(
                                  x.suggest_memory_format());
  out.relu_();
  if (s_c.defined()) {
    out.mul_(s_c.index_select(1, cut.channels).view({x.size(0), cut.channels.size(0), 1, 1}));
  }
  out = cut.conv2(out);
  return b.conv3.present() ? b.conv3(out.relu_()) : out;
}

// The cuts of channel sets that recur, least recently used first, within a byte budget,
// and the sets met once (a set is cut for keeps the second time it is met: a trained C-Net
// reuses a few sets, while one-off per-image sets would only churn the store). Gathering
// a wide conv's slices costs a good share of the conv at batch 1. Thread-safe: the runner
// releases the GIL, and a cut in use stays alive when evicted.
class SliceStore {
 public:
  static constexpr size_t kMaxSeen = 4096;

  static std::string key(int64_t block, const std::vector<char>& on) {
    std::string k(sizeof block + (on.size() + 7) / 8, '\0');
    std::memcpy(k.data(), &block, sizeof block);
    for (size_t j = 0; j < on.size(); ++j) {
      if (on[j]) k[sizeof block + j / 8] |= static_cast<char>(1 << (j % 8));
    }
    return k;
  }

  std::shared_ptr<const Cut> find(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    entries_.splice(entries_.end(), entries_, it->second);
    return it->second->second;
  }

  // Whether `key`'s set was met before; remembers it otherwise.
  bool recurring(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    if (index_.count(key) || seen_.count(key)) return true;
    seen_.insert(key);
    seen_order_.push_back(key);
    if (seen_order_.size() > kMaxSeen) {
      seen_.erase(seen_order_.front());
      seen_order_.pop_front();
    }
    return false;
  }

  void put(const std::string& key, std::shared_ptr<const Cut> cut, int64_t max_bytes) {
    if (cut->nbytes > max_bytes) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (index_.count(key)) return;
    bytes_ += cut->nbytes;
    entries_.emplace_back(key, std::move(cut));
    index_[key] = std::prev(entries_.end());
    while (bytes_ > max_bytes) {
      bytes_ -= entries_.front().second->nbytes;
      index_.erase(entries_.front().first);
      entries_.pop_front();
    }
  }

  // (block, channels kept) of every stored cut, least recently used first.
  std::vector<std::tuple<int64_t, int64_t>> contents() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::tuple<int64_t, int64_t>> out;
    for (const auto& entry : entries_) {
      out.emplace_back(entry.second->block, entry.second->channels.size(0));
    }
    return out;
  }

 private:
  using Entry = std::pair<std::string, std::shared_ptr<const Cut>>;
  mutable std::mutex mu_;
  std::list<Entry> entries_;
  std::unordered_map<std::string, std::list<Entry>::iterator> index_;
  std::unordered_set<std::string> seen_;
  std::list<std::string> seen_order_;
  int64_t bytes_ = 0;
};

// Per block, the largest fraction of active channels at which computing only those pays:
// for a set met for the first time (its slices gathered for this call) and for a recurring
// one (its cut kept in the runner's store, up to `cache_bytes`; 0: nothing kept). The
// Python path's `SparsePlan` limits.
struct SliceLimits {
  const std::vector<double>& fresh;
  const std::vector<double>& cached;
  int64_t cache_bytes;
};

// Gates of one image: clamp(W · mean_hw(x) + b, 0, 1), (1, 1 + C_mid). Small blocks
// (CIFAR widths) pool and multiply in one loop over a channels-last input; others call
// the library's reduction and matrix product, which use every core.
constexpr int64_t kFusedMaxInput = 1 << 16;   // C_in·H·W
constexpr int64_t kFusedMaxWeight = 1 << 16;  // (1 + C_mid)·C_in
constexpr int64_t kFusedMaxChannels = 1024;
constexpr int64_t kMergeGrain = 1 << 16;      // values one thread merges, at least

// Pooling and product compiled for AVX-512, AVX2 and the baseline; the loader picks the
// widest this CPU has (one build serves any x86-64 machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DYNVIZ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DYNVIZ_VECTOR_CLONES
#endif

// out[o] = clamp(scale·(w[o] · pooled) + bias[o], 0, 1): the gates from pooled sums.
inline void project(const float* __restrict pooled, int64_t c_in, const float* __restrict w,
                    const float* __restrict bias, int64_t outs, float scale,
                    float* __restrict out) {
  for (int64_t o = 0; o < outs; ++o) {
    float acc = 0.0f;
    const float* __restrict w_row = w + o * c_in;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < c_in; ++c) acc += w_row[c] * pooled[c];
    out[o] = std::clamp(acc * scale + bias[o], 0.0f, 1.0f);
  }
}

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
  project(pooled, c_in, w, bias, outs, scale, out);
}

DYNVIZ_VECTOR_CLONES
void project_pooled(const float* __restrict pooled, int64_t c_in, const float* __restrict w,
                    const float* __restrict bias, int64_t outs, float scale,
                    float* __restrict out) {
  project(pooled, c_in, w, bias, outs, scale, out);
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

// The same gates from x's sums over its `hw` positions, (B, C_in), when they are known.
Tensor gates_from_pooled(const Block& b, const Tensor& pooled, int64_t hw) {
  const int64_t c_in = pooled.size(1), outs = b.gate_weight.size(0);
  const float scale = 1.0f / static_cast<float>(hw);
  if (pooled.size(0) != 1 || b.gate_weight.scalar_type() != at::kFloat ||
      outs * c_in > kFusedMaxWeight) {
    return at::addmm(b.gate_bias, pooled, b.gate_weight.t(), 1.0, scale).clamp_(0, 1);
  }
  Tensor scores = at::empty({1, outs}, pooled.options());
  project_pooled(pooled.data_ptr<float>(), c_in, b.gate_weight.data_ptr<float>(),
                 b.gate_bias.data_ptr<float>(), outs, scale, scores.data_ptr<float>());
  return scores;
}

// Whether the runner's own loops can read x: float32 on the CPU, dense (contiguous or
// channels-last), so that each image is one run of C·H·W values whatever the layout.
bool rows_are_dense(const Tensor& x) {
  return x.scalar_type() == at::kFloat && x.device().is_cpu() &&
         (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

// x's images `rows` (ascending), in x's layout: one copy per image.
Tensor gather_rows(const Tensor& x, const std::vector<int64_t>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size()), row = x.numel() / x.size(0);
  Tensor out = at::empty({n, x.size(1), x.size(2), x.size(3)},
                         x.options().memory_format(x.suggest_memory_format()));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::copy_n(src + rows[r] * row, row, dst + r * row);
    }
  });
  return out;
}

// A residual block's output, relu(identity + scale·branch), in one pass over the memory
// (the library's add and ReLU make two), written over `branch`.
DYNVIZ_VECTOR_CLONES
void add_relu_range(float* branch, const float* identity, float scale, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) branch[k] = std::max(identity[k] + scale * branch[k], 0.0f);
}

Tensor add_relu(Tensor branch, const Tensor& identity, float scale = 1.0f) {
  if (!rows_are_dense(branch) || !rows_are_dense(identity) ||
      branch.strides() != identity.strides()) {
    return (scale == 1.0f ? branch.add_(identity) : at::add_out(branch, identity, branch, scale))
        .relu_();
  }
  float* out = branch.data_ptr<float>();
  const float* id = identity.data_ptr<float>();
  at::parallel_for(0, branch.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    add_relu_range(out + begin, id + begin, scale, end - begin);
  });
  return branch;
}

// One image's merge over channels [c0, c1): out = relu(identity + s_l·branch), written
// over `dst` (which may be `identity` or `branch` itself), and the sums of out over H×W per
// channel into `pooled` (indexed by channel). Each channel's sum runs over the positions in
// order, however the channels are split between threads.
DYNVIZ_VECTOR_CLONES
void merge_channels(float* dst, const float* identity, const float* branch, float s_l,
                    int64_t channels, int64_t hw, bool channels_last, int64_t c0, int64_t c1,
                    float* __restrict pooled) {
  if (channels_last) {
    std::fill(pooled + c0, pooled + c1, 0.0f);
    for (int64_t p = 0; p < hw; ++p) {
      const int64_t o = p * channels;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const float v = std::max(identity[o + c] + s_l * branch[o + c], 0.0f);
        dst[o + c] = v;
        pooled[c] += v;
      }
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t o = c * hw;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < hw; ++p) {
      const float v = std::max(identity[o + p] + s_l * branch[o + p], 0.0f);
      dst[o + p] = v;
      sum += v;
    }
    pooled[c] = sum;
  }
}

void merge_row(float* dst, const float* identity, const float* branch, float s_l,
               int64_t channels, int64_t hw, bool channels_last, float* pooled) {
  merge_channels(dst, identity, branch, s_l, channels, hw, channels_last, 0, channels, pooled);
}

// One image's block output, relu(identity + s_l·branch) written over `branch`, and its
// sums over H×W, (1, C): one pass, split by channels between the cores when the image is
// large (ResNet-50's first stage: 0.8 M values), when both are dense in one layout; else
// the add, the ReLU and the sums one after the other.
Tensor merge_image(Tensor& branch, const Tensor& identity, float s_l) {
  TORCH_CHECK(branch.size(0) == 1, "merge: one image");
  if (!rows_are_dense(branch) || !rows_are_dense(identity) ||
      branch.strides() != identity.strides()) {
    return add_relu(branch, identity, s_l).sum({2, 3});
  }
  const int64_t channels = branch.size(1), hw = branch.size(2) * branch.size(3);
  Tensor pooled = at::empty({1, channels}, branch.options().memory_format(
                                               at::MemoryFormat::Contiguous));
  float* out = branch.data_ptr<float>();
  const float* id = identity.data_ptr<float>();
  float* sums = pooled.data_ptr<float>();
  const bool channels_last = !branch.is_contiguous();
  const int64_t grain = std::max<int64_t>(1, kMergeGrain / hw);
  at::parallel_for(0, channels, grain, [&](int64_t c0, int64_t c1) {
    merge_channels(out, id, out, s_l, channels, hw, channels_last, c0, c1, sums);
  });
  return pooled;
}

// The sub-batch's block outputs into the batch: for r < rows.size(), image rows[r] of
// `dst` becomes relu(identity_r + s_l[r]·branch_r), identity_r being row r of `identity`
// (the gathered shortcut) or, undefined, image rows[r] of `dst` itself; row rows[r] of
// `pooled` (B, C) becomes that output's sums over H×W.
void merge_rows(Tensor& dst, const std::vector<int64_t>& rows, const Tensor& identity,
                const Tensor& branch, const std::vector<float>& s_l, Tensor& pooled) {
  const int64_t n = static_cast<int64_t>(rows.size()), row = dst.numel() / dst.size(0);
  const int64_t channels = dst.size(1), hw = dst.size(2) * dst.size(3);
  const bool channels_last = !dst.is_contiguous();
  TORCH_CHECK(branch.is_contiguous(dst.suggest_memory_format()) &&
              (!identity.defined() || identity.is_contiguous(dst.suggest_memory_format())),
              "merge_rows: branch and shortcut in the batch's layout");
  float* out = dst.data_ptr<float>();
  const float* own = identity.defined() ? identity.data_ptr<float>() : nullptr;
  const float* br = branch.data_ptr<float>();
  float* sums = pooled.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* d = out + rows[r] * row;
      merge_row(d, own ? own + r * row : d, br + r * row, s_l[r], channels, hw,
                channels_last, sums + rows[r] * channels);
    }
  });
}

class Blocks {
 public:
  // Per block: tensors (conv1 w, b, conv2 w, b, conv3 w, b, downsample w, b, gather,
  // gate weight, gate bias; an empty tensor where there is none) and ints (stride and
  // padding of conv1, conv2, conv3, downsample; C_mid; 1 for sequential gates, 0 parallel).
  Blocks(const std::vector<std::vector<Tensor>>& tensors,
         const std::vector<std::vector<int64_t>>& ints) {
    TORCH_CHECK(tensors.size() == ints.size(), "one tensor list and one int list per block");
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const auto& n = ints[i];
      TORCH_CHECK(t.size() == 11 && n.size() == 10, "block ", i, ": 11 tensors and 10 ints");
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
      b.sequential = n[9] != 0;
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

  // The merge that ends a block of `gated` at batch 1: relu(identity + s_l·branch), written
  // over `branch`, and its sums over H×W (1, C), which the next gates start from (exposed
  // to hold it to the library's add, ReLU and sum).
  Tensor merge(Tensor branch, const Tensor& identity, double s_l) const {
    return merge_image(branch, identity, static_cast<float>(s_l));
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
      x = add_relu(tail(b, out), identity);
    }
    return x;
  }

  // The gated sparse path over blocks [start, stop): each block's gates, then its shortcut
  // alone when S_L = 0, else its branch on the active channels only when that pays (the
  // `limits`, and the cut of a recurring set kept in the runner's store), or on every
  // channel multiplied by S_C unless all of them are 1 (none computed when all are 0).
  // Batches drop the images whose S_L = 0 from the block's sub-batch and slice to the
  // union of the others' active channels (`gated_batch`). `sums`: x's sums over H×W,
  // (B, C), when known (the merge of the block before). Returns the features (x itself may
  // have been overwritten) and each block's scores (B, 1 + C_mid).
  std::tuple<Tensor, std::vector<Tensor>> gated(
      Tensor x, int64_t start, int64_t stop, const std::vector<double>& slice_below,
      const std::vector<double>& slice_below_cached, int64_t cache_bytes,
      const std::optional<Tensor>& sums) const {
    check_range(start, stop);
    TORCH_CHECK(static_cast<int64_t>(slice_below.size()) == size() &&
                    static_cast<int64_t>(slice_below_cached.size()) == size(),
                "one limit per block");
    const SliceLimits limits{slice_below, slice_below_cached, cache_bytes};
    Tensor pooled;  // (B, C) sums of x over H×W, when known
    if (sums.has_value() && sums->defined()) {
      TORCH_CHECK(sums->dim() == 2 && sums->size(0) == x.size(0) && sums->size(1) == x.size(1),
                  "sums: one row of x.size(1) values per image");
      pooled = *sums;
    }
    if (x.size(0) > 1) return gated_batch(std::move(x), start, stop, limits, pooled);
    std::vector<Tensor> scores;
    for (int64_t i = start; i < stop; ++i) {
      const Block& b = blocks_[i];
      TORCH_CHECK(b.gate_weight.defined(), "block ", i, " has no gates");
      Tensor s = pooled.defined() ? gates_from_pooled(b, pooled, x.size(2) * x.size(3))
                                  : gates(b, x);
      scores.push_back(s);
      const Tensor s_cpu = s.device().is_cpu() ? s : s.cpu();
      const float* row = s_cpu.data_ptr<float>();
      const float s_l = row[0];
      if (s_l == 0.0f) {
        x = shortcut(b, x);
        if (b.downsample.present()) pooled = Tensor();
        continue;
      }
      const int64_t c = b.mid_channels;
      std::vector<char> on(c);
      int64_t n_on = 0, n_unit = 0;
      for (int64_t k = 0; k < c; ++k) {
        on[k] = row[1 + k] != 0.0f;
        n_on += on[k];
        n_unit += row[1 + k] == 1.0f;
      }
      const std::shared_ptr<const Cut> cut = cut_for(i, on, n_on, limits);
      Tensor identity = b.downsample.present() ? b.downsample(x) : x;
      const bool unit = n_unit == n_on;  // every computed channel's S_C is 1
      Tensor s_c = (cut ? unit : n_unit == c) ? Tensor() : s.narrow(1, 1, c);
      Tensor out = cut ? sliced_branch(b, x, s_c, *cut) : gated_branch(b, x, s_c, n_on == 0);
      pooled = merge_image(out, identity, s_l);
      x = out;
    }
    return {x, scores};
  }

  // (block, channels kept) of every cut the runner keeps, least recently used first.
  std::vector<std::tuple<int64_t, int64_t>> slices() const { return store_.contents(); }

 private:
  // Block i cut to the channels `on` marks (n_on of them), when computing only those pays
  // by the limits; nullptr when the block computes every channel.
  std::shared_ptr<const Cut> cut_for(int64_t i, const std::vector<char>& on, int64_t n_on,
                                     const SliceLimits& limits) const {
    const int64_t c = blocks_[i].mid_channels;
    if (n_on == 0 || n_on == c) return nullptr;
    const double fraction = static_cast<double>(n_on) / static_cast<double>(c);
    if (fraction > std::max(limits.fresh[i], limits.cached[i])) return nullptr;
    std::string key;
    bool recurring = false;
    if (limits.cache_bytes > 0 && fraction <= limits.cached[i]) {
      key = SliceStore::key(i, on);
      if (auto kept = store_.find(key)) return kept;
      recurring = store_.recurring(key);
    }
    if (!recurring && fraction > limits.fresh[i]) return nullptr;
    auto cut = std::make_shared<const Cut>(make_cut(blocks_[i], i, on));
    if (recurring) store_.put(key, cut, limits.cache_bytes);
    return cut;
  }

  // The gated sparse path for a batch, as the Python one computes it: images whose S_L = 0
  // are dropped from the block's sub-batch (gathered), the others' outputs are merged back
  // into the batch in place of their inputs, which x's owner must allow. Channels: the
  // union of the sub-batch's active channels when slicing it pays, else every channel,
  // multiplied by S_C unless all of them are 1. The gates' pooled sums of a block's output
  // come with the merge, for the images that ran it; the others' are their input's.
  std::tuple<Tensor, std::vector<Tensor>> gated_batch(
      Tensor x, int64_t start, int64_t stop, const SliceLimits& limits,
      Tensor pooled) const {   // (B, C) sums of x over H×W, when known
    if (!rows_are_dense(x)) x = x.contiguous(x.suggest_memory_format());
    const int64_t batch = x.size(0);
    std::vector<Tensor> scores;
    for (int64_t i = start; i < stop; ++i) {
      const Block& b = blocks_[i];
      TORCH_CHECK(b.gate_weight.defined(), "block ", i, " has no gates");
      const int64_t c = b.mid_channels, hw = x.size(2) * x.size(3);
      if (!pooled.defined()) pooled = x.sum({2, 3});
      Tensor s = gates_from_pooled(b, pooled, hw);
      scores.push_back(s);
      const Tensor s_cpu = s.device().is_cpu() ? s : s.cpu();
      const float* all = s_cpu.data_ptr<float>();
      std::vector<int64_t> rows;
      std::vector<float> s_l;
      std::vector<char> on(c, 0);
      for (int64_t r = 0; r < batch; ++r) {
        const float* row = all + r * (1 + c);
        if (row[0] == 0.0f) continue;
        rows.push_back(r);
        s_l.push_back(row[0]);
        for (int64_t k = 0; k < c; ++k) on[k] |= row[1 + k] != 0.0f;
      }
      if (rows.empty()) {
        x = shortcut(b, x);
        if (b.downsample.present()) pooled = Tensor();
        continue;
      }
      const int64_t n_on = std::count(on.begin(), on.end(), 1);
      const std::shared_ptr<const Cut> cut = cut_for(i, on, n_on, limits);
      bool unit = true;  // every computed channel of every image in the sub-batch has S_C 1
      for (int64_t r : rows) {
        const float* row = all + r * (1 + c);
        for (int64_t k = 0; k < c && unit; ++k) unit = row[1 + k] == 1.0f || (cut && !on[k]);
      }
      const int64_t n = static_cast<int64_t>(rows.size());
      const bool every = n == batch;
      Tensor xa = every ? x : gather_rows(x, rows);
      Tensor s_c;
      if (!unit) {
        s_c = s.narrow(1, 1, c);
        if (!every) s_c = s_c.index_select(0, at::tensor(rows, s.options().dtype(at::kLong)));
      }
      Tensor out = (cut ? sliced_branch(b, xa, s_c, *cut) : gated_branch(b, xa, s_c, n_on == 0))
                       .contiguous(x.suggest_memory_format());
      if (b.downsample.present()) {
        Tensor identity = b.downsample(x);
        if (!rows_are_dense(identity)) identity = identity.contiguous();
        Tensor ida;                            // every image's shortcut is read in place
        if (!every) {
          ida = gather_rows(identity, rows);
          identity.relu_();                    // the skipped images' output
        }
        pooled = at::empty({batch, identity.size(1)}, s.options());
        merge_rows(identity, rows, ida, out, s_l, pooled);
        if (!every) pooled = Tensor();         // the skipped images' sums are not known
        x = identity;
      } else {
        merge_rows(x, rows, Tensor(), out, s_l, pooled);
      }
    }
    return {x, scores};
  }

  void check_range(int64_t start, int64_t stop) const {
    TORCH_CHECK(0 <= start && start <= stop && stop <= size(), "blocks [", start, ", ", stop,
                ") out of range for ", size(), " blocks");
  }

  std::vector<Block> blocks_;
  mutable SliceStore store_;  // the cuts of recurring channel sets (`cut_for`)
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
      .def("gated", &Blocks::gated, py::arg("x"), py::arg("start"), py::arg("stop"),
           py::arg("slice_below"), py::arg("slice_below_cached"), py::arg("cache_bytes"),
           py::arg("sums") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("slices", &Blocks::slices)
      .def("merge", &Blocks::merge, py::call_guard<py::gil_scoped_release>());
}
