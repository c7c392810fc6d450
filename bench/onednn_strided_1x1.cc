// oneDNN 3.2's weight gradient of a 1x1 strided convolution with NHWC maps and fewer input
// channels than the SIMD block (Ci < 8 on AVX2, Ci < 16 on AVX-512), against a plain loop; no
// jaxcell involved. Build against the onednn-cpu-gomp / onednn-devel-cpu-gomp wheels (V: the
// virtual environment):
//   g++ -O2 -std=c++17 bench/onednn_strided_1x1.cc -I $V/include -L $V/lib -ldnnl -Wl,-rpath,$V/lib -o repro
//   ./repro [N Ci Co H stride]   (defaults 2 4 8 8 2); exit status 1 when wrong
// It prints the gradient's error (the worst of 20 runs: the threads race; the scratch memory and
// gradient buffer are filled with 1000 first, as memory reused by a caller would be) and how far
// past the end of its scratch memory oneDNN wrote (a guard region after it is checked).
// jit_1x1:avx2 (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2) copies the input to unit stride in
// per-thread slices of the scratch memory that are too small: with 2 threads the gradient is wrong
// (0.14-1.05 relative), with OMP_NUM_THREADS=1 it writes 64 bytes to 1.5 KB past the scratch memory.
// jit_1x1:avx512_core returned right gradients in all 252 cases tried (N 1/2/4, Ci 1-24, 8-16 px,
// stride 2/3, 1 or 2 threads), but with 2 threads and batch 1 it wrote 44 bytes to 1.8 KB past the
// scratch memory for every Ci from 1 to 15 tried (none for Ci >= 16).
// ONEDNN_MAX_CPU_ISA=SSE41 (gemm), stride 1, or Ci >= 8 on AVX2: right.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using namespace dnnl;
using tag = memory::format_tag;

int main(int argc, char** argv) {
  auto arg = [&](int i, int d) { return argc > i ? atoi(argv[i]) : d; };
  const int N = arg(1, 2), C = arg(2, 4), O = arg(3, 8), H = arg(4, 8), S = arg(5, 2), Ho = (H - 1) / S + 1;
  engine eng(engine::kind::cpu, 0);
  stream st(eng);
  auto f32 = memory::data_type::f32;
  memory::dims strides{S, S}, dil{0, 0}, pad{0, 0};
  memory::desc src_md({N, C, H, H}, f32, tag::nhwc), dst_md({N, O, Ho, Ho}, f32, tag::nhwc);
  memory::desc any_wei({O, C, 1, 1}, f32, tag::any), oihw({O, C, 1, 1}, f32, tag::oihw);
  primitive_attr attr;
  attr.set_scratchpad_mode(scratchpad_mode::user);
  auto alg = algorithm::convolution_direct;
  convolution_forward::primitive_desc fwd(eng, prop_kind::forward_training, alg, src_md, any_wei, dst_md, strides,
                                          dil, pad, pad, attr);
  convolution_backward_weights::primitive_desc pd(eng, alg, src_md, any_wei, dst_md, strides, dil, pad, pad, fwd,
                                                  attr);
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(N * H * H * C), dy(N * Ho * Ho * O), dw(O * C), ref(O * C, 0.0f);
  for (auto& v : x) v = normal(gen);
  for (auto& v : dy) v = normal(gen);
  for (int n = 0; n < N; n++)
    for (int i = 0; i < Ho; i++)
      for (int j = 0; j < Ho; j++)
        for (int o = 0; o < O; o++)
          for (int c = 0; c < C; c++)
            ref[o * C + c] += x[((n * H + i * S) * H + j * S) * C + c] * dy[((n * Ho + i) * Ho + j) * O + o];
  memory x_mem(src_md, eng, x.data()), dy_mem(dst_md, eng, dy.data()), dw_mem(oihw, eng, dw.data());
  memory blocked(pd.diff_weights_desc(), eng);
  const size_t scratch_bytes = pd.scratchpad_desc().get_size(), canary_floats = 1 << 14;
  const float canary = -7.0f;  // the guard region after the scratch memory
  std::vector<float> scratch_buffer((scratch_bytes + 3) / sizeof(float) + canary_floats);
  float* guard = scratch_buffer.data() + (scratch_bytes + 3) / sizeof(float);
  memory scratch(pd.scratchpad_desc(), eng, scratch_buffer.data());
  convolution_backward_weights conv(pd);
  double err = 0, scale = 0;
  for (int round = 0; round < 20; round++) {  // the threads race: the worst of 20 runs
    for (auto* m : {&blocked, &scratch}) {  // memory that held something before, as a caller's would
      auto* p = static_cast<float*>(m->get_data_handle());
      std::fill(p, p + m->get_desc().get_size() / sizeof(float), 1000.0f);
    }
    std::fill(guard, guard + canary_floats, canary);
    conv.execute(st, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_DST, dy_mem}, {DNNL_ARG_DIFF_WEIGHTS, blocked},
                      {DNNL_ARG_SCRATCHPAD, scratch}});
    reorder(blocked, dw_mem).execute(st, blocked, dw_mem);
    st.wait();
    for (int i = 0; i < O * C; i++) err = fmax(err, fabs(dw[i] - ref[i])), scale = fmax(scale, fabs(ref[i]));
  }
  size_t past = 0;  // bytes from the end of the scratch memory to the last one written
  for (size_t i = 0; i < canary_floats; i++)
    if (guard[i] != canary) past = (guard - scratch_buffer.data() + i + 1) * sizeof(float) - scratch_bytes;
  printf("%s  N=%d Ci=%d Co=%d H=%d stride=%d: max|error| / max|gradient| = %.3g, written past the scratch memory: "
         "%zu bytes\n", pd.impl_info_str(), N, C, O, H, S, err / scale, past);
  return err / scale > 1e-5 || past > 0;
}
