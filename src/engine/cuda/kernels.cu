// st-tune's own CUDA kernels (issue 21), only where the portable engine's candle ops are known to
// be slow on a GPU. Compiled to PTX by nvcc at build time under `--features cuda` (build.rs),
// with --fmad=false so that AdamW does the same IEEE operations as its CPU twin. Each kernel has
// a CPU twin that `st-tune bench kernels` (scripts/gpu-check.sh) compares it with:
// - st_dropout_mask: engine/mask.rs (HiddenMask::values, AttentionMasks::fill_head);
// - st_layer_norm_backward: the cpu engine's add_norm backward (engine/cpu/norm.rs);
// - st_adamw: train/optim.rs's in-place update (Update::chunk_lanes).

// SplitMix64's finaliser, as engine/mask.rs's `mix`.
__device__ __forceinline__ unsigned long long st_mix(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Dropout masks, (lines, width) row-major: line l, column c is 0 when c >= valid[l], else 0 with
// probability p and keep = 1/(1-p) otherwise, drawn from mix(bases[l] ^ c) >> 40 < threshold
// (threshold = ceil(p * 2^24)). A line's base is its row key xor its packed coordinates, so the
// masks are those the CPU draws from (seed, step, row, site, position).
extern "C" __global__ void st_dropout_mask(float *out, const unsigned long long *bases,
                                           const unsigned int *valid, unsigned int lines,
                                           unsigned int width, unsigned long long threshold,
                                           float keep) {
  unsigned long long n = (unsigned long long)lines * width;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned int line = (unsigned int)(i / width), c = (unsigned int)(i % width);
    float v = 0.0f;
    if (c < valid[line]) {
      unsigned long long h = st_mix(bases[line] ^ (unsigned long long)c) >> 40;
      v = h < threshold ? 0.0f : keep;
    }
    out[i] = v;
  }
}

// The sum of v over the block (blockDim.x a multiple of 32), the same in every thread.
__device__ float st_block_sum(float v, float *shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads(); // an earlier call's readers are done with `shared`
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.0f;
  for (unsigned int w = 0; w < (blockDim.x + 31) / 32; ++w) t += shared[w];
  return t;
}

// The backward pass of layer_norm(s) over rows of `width` (one block per row), from the output
// gradient g: ds = (g w - mean(g w) - xhat mean(g w xhat)) rstd, and dw += g xhat, db += g
// summed over rows by atomic adds (dw and db start at zero; the order of the adds is not fixed).
extern "C" __global__ void st_layer_norm_backward(const float *s, const float *w, const float *g,
                                                  float *ds, float *dw, float *db,
                                                  unsigned int rows, unsigned int width,
                                                  float eps) {
  __shared__ float shared[32];
  unsigned int r = blockIdx.x;
  if (r >= rows) return;
  const float *sr = s + (unsigned long long)r * width;
  const float *gr = g + (unsigned long long)r * width;
  float *dsr = ds + (unsigned long long)r * width;
  float acc = 0.0f;
  for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) acc += sr[c];
  float mean = st_block_sum(acc, shared) / width;
  acc = 0.0f;
  for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
    float d = sr[c] - mean;
    acc += d * d;
  }
  float rstd = 1.0f / sqrtf(st_block_sum(acc, shared) / width + eps);
  float sum_d = 0.0f, sum_dx = 0.0f;
  for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
    float xhat = (sr[c] - mean) * rstd;
    float dxhat = gr[c] * w[c];
    sum_d += dxhat;
    sum_dx += dxhat * xhat;
    atomicAdd(&dw[c], gr[c] * xhat);
    atomicAdd(&db[c], gr[c]);
  }
  float mean_d = st_block_sum(sum_d, shared) / width;
  float mean_dx = st_block_sum(sum_dx, shared) / width;
  for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
    float xhat = (sr[c] - mean) * rstd;
    dsr[c] = (gr[c] * w[c] - mean_d - xhat * mean_dx) * rstd;
  }
}

// AdamW over every parameter in one launch. Tensor t's elements are the global indices
// [ends[t-1], ends[t]); its weight, gradient and moments are at the device addresses w[t], g[t],
// m[t], v[t], and keeps[t] = 1 - lr * weight_decay (0 decay for biases and norms). The maths and
// its order are Update::chunk_lanes's, in f32 with no fused multiply-adds.
extern "C" __global__ void st_adamw(const unsigned long long *w, const unsigned long long *g,
                                    const unsigned long long *m, const unsigned long long *v,
                                    const unsigned long long *ends, const float *keeps,
                                    unsigned int tensors, unsigned long long total,
                                    float grad_scale, float beta1, float beta2, float step,
                                    float inv_sqrt_bc2, float eps) {
  float c1 = 1.0f - beta1, c2 = 1.0f - beta2;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < total;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned int lo = 0, hi = tensors;
    while (lo < hi) {
      unsigned int mid = (lo + hi) / 2;
      if (ends[mid] > i) hi = mid; else lo = mid + 1;
    }
    unsigned long long j = i - (lo == 0 ? 0ull : ends[lo - 1]);
    float *wt = (float *)w[lo], *mt = (float *)m[lo], *vt = (float *)v[lo];
    const float *gt = (const float *)g[lo];
    float gj = grad_scale * gt[j];
    float mj = beta1 * mt[j] + c1 * gj;
    float vj = beta2 * vt[j] + c2 * gj * gj;
    mt[j] = mj;
    vt[j] = vj;
    wt[j] = keeps[lo] * wt[j] - step * mj / (sqrtf(vj) * inv_sqrt_bc2 + eps);
  }
}
