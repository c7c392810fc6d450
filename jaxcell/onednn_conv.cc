// One XLA FFI handler, "jaxcell_onednn_conv": a 2-D float32 convolution (NHWC maps, HWIO
// kernel), its input gradient or its weight gradient, computed by oneDNN.
//
// Why: XLA:CPU runs every convolution through Eigen's tensor contraction, about 20% slower than
// oneDNN's convolutions on ResNet18's shapes (docs/benchmarks.md). jaxcell.onednn compiles this
// file once per machine and calls it from the convolution's custom VJP in jaxcell.models.layers.
//
//   kind 0, forward:         a = x  (N, H, W, Ci), b = w  (kh, kw, Ci, Co) -> y  (N, Ho, Wo, Co)
//   kind 1, input gradient:  a = dy (N, Ho, Wo, Co), b = w                 -> dx (N, H, W, Ci)
//   kind 2, weight gradient: a = x, b = dy                                 -> dw (kh, kw, Ci, Co)
//
// The maps stay NHWC, as XLA holds them; the kernel goes to whatever layout oneDNN's chosen
// implementation wants (a reorder of a few MB at most). Primitives are built once per shape and
// kept, each with scratch memory of its own: with the scratchpad oneDNN manages itself, a BRIN
// step's gemm-based input gradient ran on the first step and failed ("could not execute a
// primitive") on the second (XLA calls from several threads). One convolution runs at a time:
// each already uses every OpenMP thread.

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Dims = memory::dims;
using Tag = memory::format_tag;

namespace {

enum Kind : int64_t { kForward = 0, kInputGradient = 1, kWeightGradient = 2 };

struct Plan {
  dnnl::primitive conv;
  memory scratch;               // its scratchpad
  memory::desc weights;         // the kernel (or its gradient) as the primitive holds it
  bool reorder_weights;         // weights != HWIO: the kernel is reordered in, or its gradient out
  dnnl::primitive reorder;
  memory reorder_scratch;
  memory reordered;             // the kernel (or its gradient) in `weights` layout
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, Dims, Dims, Dims, Dims, Dims, Dims, Dims>;

Plan MakePlan(int64_t kind, const Dims& src, const Dims& wei, const Dims& dst, const Dims& strides,
              const Dims& dilation, const Dims& pad_lo, const Dims& pad_hi) {
  auto f32 = memory::data_type::f32;
  memory::desc src_md(src, f32, Tag::nhwc), dst_md(dst, f32, Tag::nhwc);
  memory::desc any_wei(wei, f32, Tag::any), hwio(wei, f32, Tag::hwio);
  auto alg = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training, alg, src_md,
                                                any_wei, dst_md, strides, dilation, pad_lo, pad_hi, attr);
  Plan plan;
  memory::desc scratch;
  if (kind == kForward) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.weights = fwd.weights_desc();
    scratch = fwd.scratchpad_desc();
  } else if (kind == kInputGradient) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), alg, src_md, any_wei, dst_md, strides,
                                                       dilation, pad_lo, pad_hi, fwd, attr);
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.weights = pd.weights_desc();
    scratch = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), alg, src_md, any_wei, dst_md, strides,
                                                          dilation, pad_lo, pad_hi, fwd, attr);
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.weights = pd.diff_weights_desc();
    scratch = pd.scratchpad_desc();
  }
  plan.scratch = memory(scratch, Engine());
  plan.reorder_weights = plan.weights != hwio;
  if (plan.reorder_weights) {
    auto from = kind == kWeightGradient ? plan.weights : hwio, to = kind == kWeightGradient ? hwio : plan.weights;
    dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, attr);
    plan.reorder = dnnl::reorder(pd);
    plan.reorder_scratch = memory(pd.scratchpad_desc(), Engine());
    plan.reordered = memory(plan.weights, Engine());
  }
  return plan;
}

Dims Pair(ffi::Span<const int64_t> s) { return {s[0], s[1]}; }

ffi::Error Convolve(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                    int64_t kind, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                    ffi::Span<const int64_t> padding_lo, ffi::Span<const int64_t> padding_hi) {
  if (kind < kForward || kind > kWeightGradient || strides.size() != 2 || dilation.size() != 2 ||
      padding_lo.size() != 2 || padding_hi.size() != 2 || a.dimensions().size() != 4 ||
      b.dimensions().size() != 4 || out->dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("jaxcell_onednn_conv: expects 4-D operands and 2-D attributes");
  }
  if (out->element_count() == 0) return ffi::Error::Success();
  if (a.element_count() == 0 || b.element_count() == 0) {  // an empty batch: a zero weight gradient
    std::fill_n(out->typed_data(), out->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  // The three tensors in NHWC / HWIO order, whichever of them are operands.
  auto x = kind == kInputGradient ? out->dimensions() : a.dimensions();
  auto y = kind == kForward ? out->dimensions() : kind == kInputGradient ? a.dimensions() : b.dimensions();
  auto w = kind == kWeightGradient ? out->dimensions() : b.dimensions();
  Dims src{x[0], x[3], x[1], x[2]}, dst{y[0], y[3], y[1], y[2]}, wei{w[3], w[2], w[0], w[1]};
  // oneDNN counts dilation from 0 (no dilation).
  Dims dil{dilation[0] - 1, dilation[1] - 1};
  try {
    static std::mutex mutex;
    static std::map<Key, Plan> plans;
    std::lock_guard<std::mutex> lock(mutex);
    Key key{kind, src, wei, dst, Pair(strides), dil, Pair(padding_lo), Pair(padding_hi)};
    auto found = plans.find(key);
    if (found == plans.end()) {
      found = plans.emplace(key, MakePlan(kind, src, wei, dst, Pair(strides), dil, Pair(padding_lo),
                                          Pair(padding_hi))).first;
    }
    const Plan& plan = found->second;
    auto f32 = memory::data_type::f32;
    auto& engine = Engine();
    dnnl::stream stream(engine);
    void* x_data = kind == kInputGradient ? out->untyped_data() : a.untyped_data();
    void* y_data = kind == kForward ? out->untyped_data()
                   : kind == kInputGradient ? a.untyped_data() : b.untyped_data();
    void* w_data = kind == kWeightGradient ? out->untyped_data() : b.untyped_data();
    memory src_mem({src, f32, Tag::nhwc}, engine, x_data);
    memory dst_mem({dst, f32, Tag::nhwc}, engine, y_data);
    memory hwio_mem({wei, f32, Tag::hwio}, engine, w_data);
    memory wei_mem = plan.reorder_weights ? plan.reordered : hwio_mem;
    auto reorder = [&](const memory& from, const memory& to) {
      plan.reorder.execute(stream,
                           {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, plan.reorder_scratch}});
    };
    if (plan.reorder_weights && kind != kWeightGradient) reorder(hwio_mem, wei_mem);
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, plan.scratch}};
    if (kind == kForward) {
      args.insert({{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, wei_mem}, {DNNL_ARG_DST, dst_mem}});
    } else if (kind == kInputGradient) {
      args.insert({{DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_WEIGHTS, wei_mem}, {DNNL_ARG_DIFF_DST, dst_mem}});
    } else {
      args.insert({{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_WEIGHTS, wei_mem}, {DNNL_ARG_DIFF_DST, dst_mem}});
    }
    plan.conv.execute(stream, args);
    if (plan.reorder_weights && kind == kWeightGradient) reorder(wei_mem, hwio_mem);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("jaxcell_onednn_conv: oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcellOnednnConv, Convolve,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("dilation")
                                  .Attr<ffi::Span<const int64_t>>("padding_lo")
                                  .Attr<ffi::Span<const int64_t>>("padding_hi"));
