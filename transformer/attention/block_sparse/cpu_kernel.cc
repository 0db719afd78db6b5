// Block-sparse attention on CPU, fused: each (batch*head, query block) row walks its key blocks
// with the scores, softmax and products of a chunk of key blocks in cache, instead of XLA's
// separate gathers, small batched matmuls and element-wise passes.
//
// The same library holds the kernel of one cached decoding step (DecodeStep, at the end).
//
// Built at first use by cpu_kernel.py (`c++ -O3 -march=native`), called through XLA's FFI.
// The vector code uses GCC vector extensions of the machine's own width (kLanes floats: 16 with
// AVX-512, 8 with AVX2, 4 with NEON or SSE); key blocks and head dims are multiples of 16, so of
// every width, and every machine runs the same plans.
//
// Layouts (float32, row-major), as plan.py and attention.py make them:
//   q        [bh, num_q_blocks, block_q, d]      (already scaled)
//   k        [bh, num_kv_blocks, block_kv, d]
//   v        [bh, num_kv_blocks, block_kv, dv]
//   rows     [num_rows] int32: the query block of each scheduled row
//   row_start[num_rows + 1] int32: CSR offsets into kv_block and mask_id
//   kv_block [entries] int32, mask_id [entries] int32 (0 = whole block allowed)
//   masks    [num_masks, block_q, block_kv] uint8
//   key_bias [batch, num_kv_blocks, block_kv] (0 or -inf; batch = bh / heads), or [0] for none
//   q_segments [batch, num_q_blocks, block_q], kv_segments [batch, num_kv_blocks, block_kv]
//            int32 segment ids (packed documents: a query sees a key only when their ids are
//            equal), or [0] for none
// Rows not in `rows` get output 0 and log-sum-exp +inf (as do rows that see no key).
//
// The score products want each key block transposed ([d, block_kv]: a row of scores is then a
// sum of key rows' vectors), and the backward pass wants value blocks transposed too. The kernel
// transposes them itself, into scratch (`transpose_blocks`, tile by tile), once per call
// in the forward pass and once per (batch, head) task in the backward pass: a transposed copy
// made by XLA was a separate, slow pass over memory.
//
// Segment ids differ per batch row, so which of the layout's blocks they leave is found here,
// once per call (`Walks`): each block's smallest and largest id decide whether its pair of
// blocks can hold an equal pair. Disjoint ranges cannot, and the block is never computed; two
// blocks of one and the same id need no test beyond the pattern's; the rest compare ids per
// element.
//
// Logit soft-capping (attribute soft_cap = c > 0; 0 for none) replaces each score s = q.k by
// c * tanh(s / c) before masking, in the forward and the backward pass, whose score gradient
// then carries the factor 1 - tanh^2(s / c). Attention sinks need nothing here: cpu_kernel.py
// adds them to each row's normaliser from the output and log-sum-exp, and the backward pass
// takes that log-sum-exp and dO . O.
//
// Non-finite inputs follow the dense reference (dense.py): masked and padded scores are selected
// to -inf (never added to), a NaN score makes its row NaN (a NaN row maximum is not "no key"),
// and where a chunk has pattern-masked pairs and an operand of a product holds a NaN or inf, that
// product runs over the allowed pairs only, so an excluded NaN is never multiplied by a zero
// weight. Padded keys and values arrive zeroed (attention.py). All of that is taken only when
// an input holds a NaN or inf (one check per call, `careful`): finite inputs run the plain loops.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A vector wider than the registers is no faster: GCC lowers it to stack traffic.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vec __attribute__((vector_size(kLanes * 4)));
typedef float vec_u __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(kLanes * 4)));

// Key blocks per chunk: a chunk's scores, [block_q, kChunk * block_kv], stay in L2.
constexpr int kChunk = 8;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline vec load(const float* p) { return *reinterpret_cast<const vec_u*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<vec_u*>(p) = x; }
inline vec splat(float x) { return vec{} + x; }

// exp(x) to float32 rounding: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial.
// exp(-inf) and anything below -87.3 give exactly 0. Finite inputs only (see vexp_nan).
inline vec vexp(vec x) {
  vec t = x * 1.44269504f;
  t = t > 127.0f ? splat(127.0f) : t;
  vec too_small = t < -126.0f ? splat(1.0f) : splat(0.0f);
  t = t < -126.0f ? splat(-126.0f) : t;
  ivec n = __builtin_convertvector(t + (t < 0.0f ? splat(-0.5f) : splat(0.5f)), ivec);
  vec fn = __builtin_convertvector(n, vec);
  vec r = (x - fn * 0.693145751953125f) - fn * 1.428606765330187e-06f;
  vec p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return too_small > 0.0f ? splat(0.0f) : p * scale;
}

// vexp that also takes NaN (and gives NaN): its lanes get a defined float-to-int conversion.
inline vec vexp_nan(vec x) { return x == x ? vexp(x == x ? x : splat(0.0f)) : x; }

// tanh(x), from exp(-2|x|) (in (0, 1], so nothing overflows): within a few 1e-8 of tanh,
// +-1 at +-inf, NaN at NaN.
inline vec vtanh(vec x) {
  vec a = x < 0.0f ? -x : x;
  vec e = vexp_nan(-2.0f * a);
  vec t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// s[rows, cols] = c * tanh(s / c) in place, for rows of stride ld (cols a multiple of 16).
void apply_soft_cap(float* s, long rows, long cols, long ld, float c) {
  vec cap = splat(c), inv = splat(1.0f / c);
  for (long i = 0; i < rows; ++i)
    for (long j = 0; j < cols; j += kLanes)
      store(s + i * ld + j, cap * vtanh(load(s + i * ld + j) * inv));
}

// The sum of a vector's lanes, halving: lanes [0, n/2) plus [n/2, n), and so on.
inline float hsum(vec x) {
  float t[kLanes];
  std::memcpy(t, &x, sizeof(t));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) t[l] += t[l + width];
  return t[0];
}

inline bool all_finite(const float* p, long n) {
  for (long i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

// Whether every entry of p[n] is finite, vectorised: x * 0 is 0 unless x is NaN or inf. Run once
// per call over the inputs, so that finite inputs (the normal case) skip every careful path.
inline bool all_finite_fast(const float* p, long n) {
  vec acc = splat(0.0f);
  long i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(p + i) * 0.0f;
  return hsum(acc) == 0.0f && all_finite(p + i, n - i);
}

// A register tile holds kTileRows x kTileVecs vectors of accumulators. They and a row of B
// must fit the vector registers, or every update spills to the stack: 6 x 4 takes 24 of the 32
// registers of AVX-512 and NEON, 6 x 2 takes 12 of AVX2's and SSE's 16.
constexpr int kTileRows = 6;
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kTileVecs = 4;
#else
constexpr int kTileVecs = 2;
#endif

// C[R, NV * kLanes] (+)= sum_k A[r, k] B[k, :], with A read as A[r * a_row + k * a_k] (any
// strides, so A may be a transposed view) and B's rows in `num_seg` segments of `seg_len` rows each
// (key blocks that are not adjacent in memory), B row t of segment s at b_seg[s] + t * ldb.
template <int R, int NV>
inline void tile(const float* a, long a_row, long a_k, const float* const* b_seg, int seg_len,
                 int num_seg, long ldb, float* c, long ldc, bool accumulate) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j)
      acc[r][j] = accumulate ? load(c + r * ldc + j * kLanes) : splat(0.0f);
  long k = 0;
  for (int s = 0; s < num_seg; ++s) {
    const float* b = b_seg[s];
    for (int t = 0; t < seg_len; ++t, ++k) {
      vec bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = load(b + t * ldb + j * kLanes);
      for (int r = 0; r < R; ++r) {
        float ar = a[r * a_row + k * a_k];
        for (int j = 0; j < NV; ++j) acc[r][j] += bv[j] * ar;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(c + r * ldc + j * kLanes, acc[r][j]);
}

// tile<R, nv> for nv in [1, NV].
template <int R, int NV = kTileVecs>
inline void tile_row(int nv, const float* a, long a_row, long a_k, const float* const* b_seg,
                     int seg_len, int num_seg, long ldb, float* c, long ldc, bool accumulate) {
  if constexpr (NV > 1) {
    if (nv < NV)
      return tile_row<R, NV - 1>(nv, a, a_row, a_k, b_seg, seg_len, num_seg, ldb, c, ldc,
                                 accumulate);
  }
  tile<R, NV>(a, a_row, a_k, b_seg, seg_len, num_seg, ldb, c, ldc, accumulate);
}

template <int R>
inline void tile_rows(int rows, int nv, const float* a, long a_row, long a_k,
                      const float* const* b_seg, int seg_len, int num_seg, long ldb, float* c,
                      long ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R)
      return tile_row<R>(nv, a, a_row, a_k, b_seg, seg_len, num_seg, ldb, c, ldc, accumulate);
    return tile_rows<R - 1>(rows, nv, a, a_row, a_k, b_seg, seg_len, num_seg, ldb, c, ldc,
                            accumulate);
  }
}

// C[m, n] (+)= A[m, K] B[K, n] with n a multiple of kLanes, in register tiles of kTileRows rows
// x kTileVecs * kLanes columns.
void matmul(int m, int n, const float* a, long a_row, long a_k, const float* const* b_seg,
            int seg_len, int num_seg, long ldb, float* c, long ldc, bool accumulate) {
  for (int col = 0; col < n; col += kTileVecs * kLanes) {
    int nv = std::min(kTileVecs, (n - col) / kLanes);
    const float* b_cols[kChunk];
    for (int s = 0; s < num_seg; ++s) b_cols[s] = b_seg[s] + col;
    for (int row = 0; row < m; row += kTileRows)
      tile_rows<kTileRows>(std::min(kTileRows, m - row), nv, a + row * a_row, a_row, a_k, b_cols,
                           seg_len, num_seg, ldb, c + row * ldc + col, ldc, accumulate);
  }
}

struct Shapes {
  long bh, heads, num_q_blocks, num_kv_blocks, block_q, block_kv, d, dv;
  float soft_cap;  // c of c * tanh(s / c), or 0: no cap
};

struct Layout {
  const int32_t* rows;
  const int32_t* row_start;
  const int32_t* kv_block;
  const int32_t* mask_id;
  const uint8_t* masks;
  const float* key_bias;  // null: no padded keys
  long num_rows;
};

// The key blocks one (batch, row) computes, in order: indices into the layout's kv_block and
// mask_id, and per index whether segment ids are compared element by element in that block.
struct Walk {
  const int32_t* entry;
  const uint8_t* split;  // null: no segment ids
  int n;
};

// The smallest and largest segment id of a block.
struct IdRange {
  int32_t lo, hi;
};

std::vector<IdRange> block_ranges(const int32_t* ids, long blocks, long size) {
  std::vector<IdRange> ranges(blocks);
  for (long i = 0; i < blocks; ++i) {
    auto [lo, hi] = std::minmax_element(ids + i * size, ids + (i + 1) * size);
    ranges[i] = {*lo, *hi};
  }
  return ranges;
}

// Every (batch, row)'s walk, found once per call. Without segment ids every batch row walks the
// layout's entries as they are.
class Walks {
 public:
  Walks(const Shapes& sh, const Layout& lay, const int32_t* q_ids, const int32_t* kv_ids)
      : num_rows_(lay.num_rows), row_start_(lay.row_start), segments_(q_ids != nullptr) {
    if (!segments_) {
      entry_.resize(lay.row_start[lay.num_rows]);
      for (size_t e = 0; e < entry_.size(); ++e) entry_[e] = static_cast<int32_t>(e);
      return;
    }
    long batch = sh.bh / sh.heads;
    auto q_range = block_ranges(q_ids, batch * sh.num_q_blocks, sh.block_q);
    auto kv_range = block_ranges(kv_ids, batch * sh.num_kv_blocks, sh.block_kv);
    start_.reserve(batch * num_rows_ + 1);
    start_.push_back(0);
    for (long b = 0; b < batch; ++b)
      for (long r = 0; r < num_rows_; ++r) {
        IdRange q = q_range[b * sh.num_q_blocks + lay.rows[r]];
        for (int e = lay.row_start[r]; e < lay.row_start[r + 1]; ++e) {
          IdRange k = kv_range[b * sh.num_kv_blocks + lay.kv_block[e]];
          if (q.hi < k.lo || k.hi < q.lo) continue;  // no id in common: nothing to compute
          entry_.push_back(e);
          split_.push_back(!(q.lo == q.hi && k.lo == k.hi));  // else both hold one equal id
        }
        start_.push_back(static_cast<long>(entry_.size()));
      }
  }

  Walk of(long b, long r) const {
    if (!segments_)
      return {entry_.data() + row_start_[r], nullptr, row_start_[r + 1] - row_start_[r]};
    long i = b * num_rows_ + r;
    return {entry_.data() + start_[i], split_.data() + start_[i],
            static_cast<int>(start_[i + 1] - start_[i])};
  }

 private:
  long num_rows_;
  const int32_t* row_start_;
  bool segments_;
  std::vector<int32_t> entry_;
  std::vector<uint8_t> split_;
  std::vector<long> start_;  // [batch * num_rows + 1] offsets into entry_ and split_
};

// Up to kChunk key blocks of one (batch, row), computed together; c indexes them.
struct Chunk {
  const int32_t* entry;
  const uint8_t* split;   // null: no segment ids
  int n;
  long b;                 // batch row
  const int32_t* q_ids;   // the row's query ids [block_q], or null
  const int32_t* kv_ids;  // the batch row's key ids [num_kv_blocks, block_kv], or null

  int block(const Layout& lay, int c) const { return lay.kv_block[entry[c]]; }
  bool split_ids(int c) const { return split && split[c]; }
};

// The chunk of up to kChunk blocks from the `first`-th of walk `w`, of query block qb.
Chunk chunk_of(const Shapes& sh, const Walk& w, int first, long b, const int32_t* q_ids,
               const int32_t* kv_ids, long qb) {
  int n = std::min(kChunk, w.n - first);
  if (!q_ids) return {w.entry + first, nullptr, n, b, nullptr, nullptr};
  return {w.entry + first, w.split + first, n, b,
          q_ids + (b * sh.num_q_blocks + qb) * sh.block_q,
          kv_ids + b * sh.num_kv_blocks * sh.block_kv};
}

// Whether block c of a chunk is partly masked, by the pattern (mask id 0 = all allowed) or by
// segment ids.
inline bool masked(const Layout& lay, const Chunk& ch, int c) {
  return lay.mask_id[ch.entry[c]] != 0 || ch.split_ids(c);
}

// Whether query i of the row may attend to key jj of the chunk's block c (pattern and segments;
// padded keys are zeros, so the careful paths need not exclude them).
inline bool allowed(const Shapes& sh, const Layout& lay, const Chunk& ch, int c, long i,
                    long jj) {
  int id = lay.mask_id[ch.entry[c]];
  if (id != 0 && !lay.masks[(id * sh.block_q + i) * sh.block_kv + jj]) return false;
  return !ch.split_ids(c) || ch.q_ids[i] == ch.kv_ids[ch.block(lay, c) * sh.block_kv + jj];
}

// dst[i] = src[i]^T for `blocks` consecutive [rows, cols] blocks, 16 x 16 tiles at a time so
// that both the reads and the writes stay within a few cache lines.
void transpose_blocks(const float* src, long blocks, long rows, long cols, float* dst) {
  constexpr long kTile = 16;
  for (long b = 0; b < blocks; ++b, src += rows * cols, dst += rows * cols)
    for (long r0 = 0; r0 < rows; r0 += kTile)
      for (long c0 = 0; c0 < cols; c0 += kTile) {
        long r_end = std::min(rows, r0 + kTile), c_end = std::min(cols, c0 + kTile);
        for (long c = c0; c < c_end; ++c)
          for (long r = r0; r < r_end; ++r) dst[c * rows + r] = src[r * cols + c];
      }
}

// Scores of one chunk: s[block_q, n * block_kv] = q k^T (soft-capped when sh.soft_cap > 0),
// -inf where masked (pattern or segments) or padded.
void chunk_scores(const Shapes& sh, const Layout& lay, const Chunk& ch, const float* q_row,
                  const float* k_t, float* s) {
  long width = ch.n * sh.block_kv;
  for (int c = 0; c < ch.n; ++c) {
    long kb = ch.block(lay, c);
    const float* kt_block = k_t + kb * sh.d * sh.block_kv;
    matmul(sh.block_q, sh.block_kv, q_row, sh.d, 1, &kt_block, sh.d, 1, sh.block_kv,
           s + c * sh.block_kv, width, false);
    // Before the mask: an excluded score must stay -inf, not become -c.
    if (sh.soft_cap > 0.0f)
      apply_soft_cap(s + c * sh.block_kv, sh.block_q, sh.block_kv, width, sh.soft_cap);
    int id = lay.mask_id[ch.entry[c]];
    const float* bias = lay.key_bias
                            ? lay.key_bias + (ch.b * sh.num_kv_blocks + kb) * sh.block_kv
                            : nullptr;
    bool split = ch.split_ids(c);
    if (id == 0 && !bias && !split) continue;
    const uint8_t* mask = lay.masks + id * sh.block_q * sh.block_kv;
    const int32_t* kv_ids = split ? ch.kv_ids + kb * sh.block_kv : nullptr;
    for (long i = 0; i < sh.block_q; ++i) {
      float* s_i = s + i * width + c * sh.block_kv;
      int32_t q_id = split ? ch.q_ids[i] : 0;
      for (long j = 0; j < sh.block_kv; ++j) {
        // Selected, not added: NaN + -inf would be NaN.
        bool keep = (id == 0 || mask[i * sh.block_kv + j]) && !(bias && bias[j] != 0.0f) &&
                    !(split && kv_ids[j] != q_id);
        s_i[j] = keep ? s_i[j] : -kInf;
      }
    }
  }
}

// Runs body(item) for item in [0, count) on the caller and the XLA thread pool's threads. The
// caller takes items too, so this finishes even when no pool thread is free.
void parallel_for(ffi::ThreadPool& pool, long count, const std::function<void(long)>& body) {
  struct State {
    std::atomic<long> next{0};
    std::atomic<long> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  long count_copy = count;
  auto work = [state, count_copy, &body]() {
    long finished = 0;
    for (long i; (i = state->next.fetch_add(1)) < count_copy;) {
      body(i);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == count_copy) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  long helpers = std::min<long>(std::max<long>(pool.num_threads(), 1), count) - 1;
  // A helper that starts after all items are taken touches only `state`, which it co-owns; it
  // never calls `body` (a reference into this frame), because `next` is already past `count`.
  for (long h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == count_copy; });
}

// all_finite_fast over several arrays, in pieces on the pool's threads: on a sparse layout
// this pass over the inputs is a fair share of a call's work.
bool all_finite_parallel(ffi::ThreadPool& pool,
                         std::initializer_list<std::pair<const float*, long>> arrays) {
  constexpr long kPiece = 1 << 18;
  std::vector<std::pair<const float*, long>> pieces;
  for (auto [data, n] : arrays)
    for (long start = 0; start < n; start += kPiece)
      pieces.emplace_back(data + start, std::min(kPiece, n - start));
  std::atomic<bool> finite{true};
  parallel_for(pool, static_cast<long>(pieces.size()), [&](long i) {
    if (finite.load(std::memory_order_relaxed) &&
        !all_finite_fast(pieces[i].first, pieces[i].second))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

Layout layout_of(ffi::Buffer<ffi::S32>& rows, ffi::Buffer<ffi::S32>& row_start,
                 ffi::Buffer<ffi::S32>& kv_block, ffi::Buffer<ffi::S32>& mask_id,
                 ffi::Buffer<ffi::U8>& masks, ffi::Buffer<ffi::F32>& key_bias) {
  return Layout{rows.typed_data(), row_start.typed_data(), kv_block.typed_data(),
                mask_id.typed_data(), masks.typed_data(),
                key_bias.element_count() ? key_bias.typed_data() : nullptr,
                static_cast<long>(rows.element_count())};
}

// The segment ids' data, or null for none ([0]).
const int32_t* ids_or_null(ffi::Buffer<ffi::S32>& ids) {
  return ids.element_count() ? ids.typed_data() : nullptr;
}

// The Python side builds these shapes; a mismatch would read out of bounds, so say so instead.
ffi::Error check(const Shapes& sh, const Layout& lay, const ffi::Buffer<ffi::F32>& key_bias,
                 const ffi::Buffer<ffi::S32>& q_segments,
                 const ffi::Buffer<ffi::S32>& kv_segments) {
  if (sh.heads <= 0 || sh.bh % sh.heads)
    return ffi::Error::InvalidArgument("batch * heads is not a multiple of heads");
  if (sh.block_kv % kLanes || sh.d % kLanes || sh.dv % kLanes)
    return ffi::Error::InvalidArgument("block_kv, d and dv must be multiples of 16");
  long batch = sh.bh / sh.heads;
  long bias = key_bias.element_count();
  if (bias && bias != batch * sh.num_kv_blocks * sh.block_kv)
    return ffi::Error::InvalidArgument("key_bias is not [batch, num_kv_blocks, block_kv]");
  long q_ids = q_segments.element_count(), kv_ids = kv_segments.element_count();
  if ((q_ids || kv_ids) && (q_ids != batch * sh.num_q_blocks * sh.block_q ||
                            kv_ids != batch * sh.num_kv_blocks * sh.block_kv))
    return ffi::Error::InvalidArgument(
        "segment ids are not [batch, num_q_blocks, block_q] and [batch, num_kv_blocks, "
        "block_kv]");
  for (long r = 0; r < lay.num_rows; ++r)
    if (lay.rows[r] < 0 || lay.rows[r] >= sh.num_q_blocks)
      return ffi::Error::InvalidArgument("a row's query block is out of range");
  for (long e = lay.row_start[0]; e < lay.row_start[lay.num_rows]; ++e)
    if (lay.kv_block[e] < 0 || lay.kv_block[e] >= sh.num_kv_blocks)
      return ffi::Error::InvalidArgument("a key block is out of range");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> rows,
                       ffi::Buffer<ffi::S32> row_start, ffi::Buffer<ffi::S32> kv_block,
                       ffi::Buffer<ffi::S32> mask_id, ffi::Buffer<ffi::U8> masks,
                       ffi::Buffer<ffi::F32> key_bias, ffi::Buffer<ffi::S32> q_segments,
                       ffi::Buffer<ffi::S32> kv_segments, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse, int64_t heads, float soft_cap) {
  auto kd = k.dimensions();
  Shapes sh{q.dimensions()[0], heads, q.dimensions()[1], kd[1], q.dimensions()[2], kd[2],
            q.dimensions()[3], v.dimensions()[3], soft_cap};
  Layout lay = layout_of(rows, row_start, kv_block, mask_id, masks, key_bias);
  if (ffi::Error error = check(sh, lay, key_bias, q_segments, kv_segments); error.failure())
    return error;
  const int32_t *q_ids = ids_or_null(q_segments), *kv_ids = ids_or_null(kv_segments);
  const Walks walks(sh, lay, q_ids, kv_ids);
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  // The items write every row of their query blocks; the blocks no row schedules are zeros.
  std::vector<bool> scheduled(sh.num_q_blocks, false);
  for (long r = 0; r < lay.num_rows; ++r) scheduled[lay.rows[r]] = true;
  for (long bh = 0; bh < sh.bh; ++bh)
    for (long qb = 0; qb < sh.num_q_blocks; ++qb) {
      if (scheduled[qb]) continue;
      long first_row = (bh * sh.num_q_blocks + qb) * sh.block_q;
      std::fill(out_data + first_row * sh.dv, out_data + (first_row + sh.block_q) * sh.dv, 0.0f);
      std::fill(lse_data + first_row, lse_data + first_row + sh.block_q, kInf);
    }
  const float* q_data = q.typed_data();
  const float* v_data = v.typed_data();
  // Finite inputs cannot carry a NaN or inf from an excluded pair into a product (0 * finite =
  // 0), so only inputs holding one take the careful paths below.
  const bool careful = !all_finite_parallel(
      pool, {{q_data, q.element_count()}, {k.typed_data(), k.element_count()},
             {v_data, v.element_count()}});
  // Every key block transposed, shared by the items: rows of many items read each block. Kept
  // per calling thread, so that calls neither reallocate it nor share it.
  thread_local std::vector<float> k_transposed;
  k_transposed.resize(k.element_count());
  // Through a pointer: in the pool's threads, `k_transposed` names their own (empty) vectors.
  float* kt_scratch = k_transposed.data();
  parallel_for(pool, sh.bh, [&](long bh) {
    long offset = bh * sh.num_kv_blocks * sh.block_kv * sh.d;
    transpose_blocks(k.typed_data() + offset, sh.num_kv_blocks, sh.block_kv, sh.d,
                     kt_scratch + offset);
  });
  const float* kt_data = kt_scratch;

  parallel_for(pool, sh.bh * lay.num_rows, [&](long item) {
    long bh = item / lay.num_rows, r = item % lay.num_rows, b = bh / sh.heads;
    long qb = lay.rows[r];
    const float* q_row = q_data + ((bh * sh.num_q_blocks + qb) * sh.block_q) * sh.d;
    const float* kt = kt_data + bh * sh.num_kv_blocks * sh.d * sh.block_kv;
    const float* vb = v_data + bh * sh.num_kv_blocks * sh.block_kv * sh.dv;
    float* o = out_data + ((bh * sh.num_q_blocks + qb) * sh.block_q) * sh.dv;
    float* row_lse = lse_data + (bh * sh.num_q_blocks + qb) * sh.block_q;
    thread_local std::vector<float> scores;
    scores.resize(sh.block_q * kChunk * sh.block_kv);
    std::vector<float> row_max(sh.block_q, -kInf), row_sum(sh.block_q, 0.0f);
    const Walk walk = walks.of(b, r);
    for (int first = 0; first < walk.n; first += kChunk) {
      const Chunk ch = chunk_of(sh, walk, first, b, q_ids, kv_ids, qb);
      const int n = ch.n;
      long width = n * sh.block_kv;
      float* s = scores.data();
      chunk_scores(sh, lay, ch, q_row, kt, s);
      // Online softmax (as in FlashAttention): rescale what earlier chunks summed.
      for (long i = 0; i < sh.block_q; ++i) {
        float* s_i = s + i * width;
        vec m = splat(-kInf);
        for (long j = 0; j < width; j += kLanes) {
          vec x = load(s_i + j);
          m = x > m ? x : m;
        }
        float new_max = row_max[i];
        for (int l = 0; l < kLanes; ++l) new_max = std::max(new_max, m[l]);
        if (careful) {
          // A NaN score makes the row NaN: the comparisons above skip it, so say so.
          bool any_nan = std::isnan(row_max[i]);
          for (long j = 0; j < width; ++j) any_nan |= std::isnan(s_i[j]);
          if (any_nan) new_max = std::numeric_limits<float>::quiet_NaN();
        }
        // A row that has seen only masked keys keeps max -inf; shift by 0 so exp() gives 0. A
        // +inf or NaN max stays: exp(inf - inf) and exp(x - NaN) are NaN, as in the reference.
        float shift = new_max == -kInf ? 0.0f : new_max;
        float rescale = std::exp(row_max[i] - shift);
        vec sum = splat(0.0f);
        if (careful) {
          for (long j = 0; j < width; j += kLanes) {
            vec p = vexp_nan(load(s_i + j) - shift);
            store(s_i + j, p);
            sum += p;
          }
        } else {
          for (long j = 0; j < width; j += kLanes) {
            vec p = vexp(load(s_i + j) - shift);
            store(s_i + j, p);
            sum += p;
          }
        }
        float chunk_sum = 0.0f;
        for (int l = 0; l < kLanes; ++l) chunk_sum += sum[l];
        row_sum[i] = row_sum[i] * rescale + chunk_sum;
        row_max[i] = new_max;
        if (first != 0 && rescale != 1.0f)
          for (long j = 0; j < sh.dv; ++j) o[i * sh.dv + j] *= rescale;
      }
      const float* v_seg[kChunk];
      bool exact = false;
      for (int c = 0; c < n; ++c) {
        v_seg[c] = vb + ch.block(lay, c) * sh.block_kv * sh.dv;
        exact |= careful && masked(lay, ch, c) && !all_finite(v_seg[c], sh.block_kv * sh.dv);
      }
      if (exact) {
        // A NaN or inf value in a partly masked block: only allowed pairs multiply it.
        if (first == 0) std::fill(o, o + sh.block_q * sh.dv, 0.0f);
        for (long i = 0; i < sh.block_q; ++i)
          for (int c = 0; c < n; ++c)
            for (long jj = 0; jj < sh.block_kv; ++jj) {
              if (!allowed(sh, lay, ch, c, i, jj)) continue;
              float w = s[i * width + c * sh.block_kv + jj];
              const float* v_j = v_seg[c] + jj * sh.dv;
              for (long e = 0; e < sh.dv; ++e) o[i * sh.dv + e] += w * v_j[e];
            }
      } else {
        matmul(sh.block_q, sh.dv, s, width, 1, v_seg, sh.block_kv, n, sh.dv, o, sh.dv,
               first != 0);
      }
    }
    for (long i = 0; i < sh.block_q; ++i) {
      // Not row_sum > 0: a NaN row has keys, and its NaN output and log-sum-exp carry on.
      if (row_max[i] != -kInf) {
        float inv = 1.0f / row_sum[i];
        for (long j = 0; j < sh.dv; ++j) o[i * sh.dv + j] *= inv;
        row_lse[i] = row_max[i] + std::log(row_sum[i]);
      } else {
        for (long j = 0; j < sh.dv; ++j) o[i * sh.dv + j] = 0.0f;
        row_lse[i] = kInf;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> rows,
                        ffi::Buffer<ffi::S32> row_start, ffi::Buffer<ffi::S32> kv_block,
                        ffi::Buffer<ffi::S32> mask_id, ffi::Buffer<ffi::U8> masks,
                        ffi::Buffer<ffi::F32> key_bias, ffi::Buffer<ffi::S32> q_segments,
                        ffi::Buffer<ffi::S32> kv_segments, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                        int64_t heads, float soft_cap) {
  auto kd = k.dimensions();
  Shapes sh{q.dimensions()[0], heads, q.dimensions()[1], kd[1], q.dimensions()[2], kd[2],
            q.dimensions()[3], d_out.dimensions()[3], soft_cap};
  Layout lay = layout_of(rows, row_start, kv_block, mask_id, masks, key_bias);
  if (ffi::Error error = check(sh, lay, key_bias, q_segments, kv_segments); error.failure())
    return error;
  const int32_t *q_ids = ids_or_null(q_segments), *kv_ids = ids_or_null(kv_segments);
  const Walks walks(sh, lay, q_ids, kv_ids);
  const float *q_data = q.typed_data(), *k_data = k.typed_data(), *v_data = v.typed_data(),
              *do_data = d_out.typed_data(),
              *lse_data = lse.typed_data(), *delta_data = delta.typed_data();
  float *dq_data = dq->typed_data(), *dk_data = dk->typed_data(), *dv_data = dv->typed_data();
  // As in the forward pass; a NaN in dO would reach dV through an excluded pair's zero weight.
  const bool careful = !all_finite_parallel(
      pool, {{q_data, q.element_count()}, {k_data, k.element_count()},
             {v_data, v.element_count()}, {do_data, d_out.element_count()}});

  // One (batch, head) per task: its rows share key blocks, whose dK and dV they accumulate.
  parallel_for(pool, sh.bh, [&](long bh) {
    long b = bh / sh.heads;
    long kv_base = bh * sh.num_kv_blocks * sh.block_kv;  // first key of this (batch, head)
    // This (batch, head)'s keys and values, each block transposed: its rows revisit the blocks.
    thread_local std::vector<float> k_transposed, v_transposed;
    k_transposed.resize(sh.num_kv_blocks * sh.block_kv * sh.d);
    v_transposed.resize(sh.num_kv_blocks * sh.block_kv * sh.dv);
    transpose_blocks(k_data + kv_base * sh.d, sh.num_kv_blocks, sh.block_kv, sh.d,
                     k_transposed.data());
    transpose_blocks(v_data + kv_base * sh.dv, sh.num_kv_blocks, sh.block_kv, sh.dv,
                     v_transposed.data());
    const float* kt = k_transposed.data();
    const float* vt = v_transposed.data();
    // This task's gradients, zeroed here (on the pool, not serially before it): every row and
    // key block of one (batch, head) accumulates only into them.
    long q_rows = sh.num_q_blocks * sh.block_q, kv_rows = sh.num_kv_blocks * sh.block_kv;
    std::fill(dq_data + bh * q_rows * sh.d, dq_data + (bh + 1) * q_rows * sh.d, 0.0f);
    std::fill(dk_data + kv_base * sh.d, dk_data + (kv_base + kv_rows) * sh.d, 0.0f);
    std::fill(dv_data + kv_base * sh.dv, dv_data + (kv_base + kv_rows) * sh.dv, 0.0f);
    std::vector<float> probs(sh.block_q * kChunk * sh.block_kv);
    std::vector<float> d_logits(sh.block_q * kChunk * sh.block_kv);
    for (long r = 0; r < lay.num_rows; ++r) {
      long qb = lay.rows[r];
      long q_base = (bh * sh.num_q_blocks + qb) * sh.block_q;  // first query of this row
      const float* q_row = q_data + q_base * sh.d;
      const float* do_row = do_data + q_base * sh.dv;
      const float* row_lse = lse_data + q_base;
      const float* row_delta = delta_data + q_base;
      float* dq_row = dq_data + q_base * sh.d;
      const Walk walk = walks.of(b, r);
      for (int first = 0; first < walk.n; first += kChunk) {
        const Chunk ch = chunk_of(sh, walk, first, b, q_ids, kv_ids, qb);
        const int n = ch.n;
        long width = n * sh.block_kv;
        float* p = probs.data();
        float* ds = d_logits.data();
        chunk_scores(sh, lay, ch, q_row, kt, p);
        // dP = dO V^T, one key block at a time.
        for (int c = 0; c < n; ++c) {
          const float* vt_block = vt + ch.block(lay, c) * sh.dv * sh.block_kv;
          matmul(sh.block_q, sh.block_kv, do_row, sh.dv, 1, &vt_block, sh.dv, 1, sh.block_kv,
                 ds + c * sh.block_kv, width, false);
        }
        for (long i = 0; i < sh.block_q; ++i) {
          vec lse_i = splat(row_lse[i]), delta_i = splat(row_delta[i]);
          if (sh.soft_cap > 0.0f) {
            vec inv = splat(1.0f / sh.soft_cap);
            for (long j = 0; j < width; j += kLanes) {
              vec capped = load(p + i * width + j);
              vec x = capped - lse_i;
              vec prob = careful ? vexp_nan(x) : vexp(x);
              store(p + i * width + j, prob);
              // d(c tanh(s / c)) / ds = 1 - t^2 with t = capped / c; an excluded score (-inf)
              // gives t = -1, slope 0, and its probability is 0 anyway.
              vec t = capped * inv;
              t = t > -1.0f ? t : splat(-1.0f);
              vec slope = 1.0f - t * t;
              store(ds + i * width + j, prob * (load(ds + i * width + j) - delta_i) * slope);
            }
            continue;
          }
          for (long j = 0; j < width; j += kLanes) {
            // +inf log-sum-exp (a row with no key) gives probabilities exactly 0.
            vec x = load(p + i * width + j) - lse_i;
            vec prob = careful ? vexp_nan(x) : vexp(x);
            store(p + i * width + j, prob);
            store(ds + i * width + j, prob * (load(ds + i * width + j) - delta_i));
          }
        }
        bool any_masked = false;
        for (int c = 0; c < n && careful; ++c) {
          if (!masked(lay, ch, c)) continue;
          any_masked = true;
          // Excluded pairs: exactly 0, even in a NaN row (exp(-inf - NaN)) or where dO V^T is
          // NaN from an excluded value.
          for (long i = 0; i < sh.block_q; ++i)
            for (long jj = 0; jj < sh.block_kv; ++jj)
              if (!allowed(sh, lay, ch, c, i, jj))
                p[i * width + c * sh.block_kv + jj] = ds[i * width + c * sh.block_kv + jj] = 0.0f;
        }
        const float* k_seg[kChunk];
        bool keys_finite = true;
        for (int c = 0; c < n; ++c) {
          long kb = ch.block(lay, c);
          k_seg[c] = k_data + (kv_base + kb * sh.block_kv) * sh.d;
          if (careful && masked(lay, ch, c))
            keys_finite &= all_finite(k_seg[c], sh.block_kv * sh.d);
        }
        bool rows_finite = !any_masked || (all_finite(do_row, sh.block_q * sh.dv) &&
                                           all_finite(q_row, sh.block_q * sh.d));
        for (int c = 0; c < n; ++c) {
          long kb = ch.block(lay, c);
          float* dv_block = dv_data + (kv_base + kb * sh.block_kv) * sh.dv;
          float* dk_block = dk_data + (kv_base + kb * sh.block_kv) * sh.d;
          if (!rows_finite && masked(lay, ch, c)) {
            // A NaN or inf query or output gradient: only allowed pairs multiply it.
            for (long i = 0; i < sh.block_q; ++i)
              for (long jj = 0; jj < sh.block_kv; ++jj) {
                if (!allowed(sh, lay, ch, c, i, jj)) continue;
                float w_p = p[i * width + c * sh.block_kv + jj];
                float w_s = ds[i * width + c * sh.block_kv + jj];
                for (long e = 0; e < sh.dv; ++e) dv_block[jj * sh.dv + e] += w_p * do_row[i * sh.dv + e];
                for (long e = 0; e < sh.d; ++e) dk_block[jj * sh.d + e] += w_s * q_row[i * sh.d + e];
              }
            continue;
          }
          // dV_block += P_block^T dO and dK_block += dS_block^T Q: A is read transposed.
          matmul(sh.block_kv, sh.dv, p + c * sh.block_kv, 1, width, &do_row, sh.block_q, 1,
                 sh.dv, dv_block, sh.dv, true);
          matmul(sh.block_kv, sh.d, ds + c * sh.block_kv, 1, width, &q_row, sh.block_q, 1,
                 sh.d, dk_block, sh.d, true);
        }
        if (keys_finite) {
          matmul(sh.block_q, sh.d, ds, width, 1, k_seg, sh.block_kv, n, sh.d, dq_row, sh.d, true);
        } else {
          // A NaN or inf key in a partly masked block: only allowed pairs multiply it.
          for (long i = 0; i < sh.block_q; ++i)
            for (int c = 0; c < n; ++c)
              for (long jj = 0; jj < sh.block_kv; ++jj) {
                if (!allowed(sh, lay, ch, c, i, jj)) continue;
                float w = ds[i * width + c * sh.block_kv + jj];
                const float* k_j = k_seg[c] + jj * sh.d;
                for (long e = 0; e < sh.d; ++e) dq_row[i * sh.d + e] += w * k_j[e];
              }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// out[0..VECS*kLanes) = sum over j < n of w[j] * v[j, :], with rows of VECS vectors, summed in
// registers, even and odd keys apart (two chains of dependent additions instead of one). No key
// is skipped, so 0 * NaN stays NaN, as in the reference.
template <int VECS>
void weighted_sum(const float* w, const float* v, long n, float* out) {
  vec even[VECS], odd[VECS];
  for (int c = 0; c < VECS; ++c) even[c] = odd[c] = splat(0.0f);
  long j = 0;
  for (; j + 2 <= n; j += 2) {
    vec w0 = splat(w[j]), w1 = splat(w[j + 1]);
    const float* v0 = v + j * VECS * kLanes;
    for (int c = 0; c < VECS; ++c) {
      even[c] += w0 * load(v0 + c * kLanes);
      odd[c] += w1 * load(v0 + (VECS + c) * kLanes);
    }
  }
  if (j < n) {
    vec w0 = splat(w[j]);
    for (int c = 0; c < VECS; ++c) even[c] += w0 * load(v + (j * VECS + c) * kLanes);
  }
  for (int c = 0; c < VECS; ++c) store(out + c * kLanes, even[c] + odd[c]);
}

void weighted_sum_any(const float* w, const float* v, long n, long dv, float* out) {
  for (long e = 0; e < dv; ++e) out[e] = 0.0f;
  for (long j = 0; j < n; ++j) {
    vec wj = splat(w[j]);
    for (long e = 0; e < dv; e += kLanes) store(out + e, load(out + e) + wj * load(v + j * dv + e));
  }
}

// One cached decoding step (kv_cache.py): each (batch, key/value head) writes its new key and
// value at its position p into the caches, then each (batch, query head) row attends from its
// query over the keys it may see. Grouped-query attention: query head h reads key/value head
// h / (heads / kv_heads), so a group's rows share one cache row. Layouts (float32, row-major):
//   q [batch, heads, d] (already scaled); k_new [batch, kv_heads, d]; v_new [batch, kv_heads, dv]
//   k_cache  [batch, kv_heads, slots, d]; v_cache [batch, kv_heads, slots, dv] (updated in place:
//            the outputs alias them)
//   positions[batch] int32; slopes [heads] (ALiBi: logit - slope * (p - j)) or [0] for none
//   sinks    [heads] sink logits (in the softmax's denominator, with a zero value) or [0]
//   soft_cap c > 0: each q.k becomes c * tanh(q.k / c), before ALiBi and masking; 0: none
// ring == 0: slot j holds position j; a step writes slot p and reads slots 0..p, nothing past p.
//   A position past `slots` writes nothing and reads every key; a negative one reads none.
// ring == 1: a sliding window of slots - 1 keys back; slot s holds the latest position
//   q <= p with q % slots == s (the ring is written in order), and a step writes slot p % slots,
//   then reads every slot whose q >= 0. Negative positions write and read nothing.
// Over the keys it reads, a step is plain IEEE arithmetic, as the dense reference over allowed
// pairs: a NaN logit or value gives NaN, +inf gives a NaN row, and a row whose logits are all
// -inf (or that reads no key) gets zeros.
ffi::Error DecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                      ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k_cache,
                      ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> positions,
                      ffi::Buffer<ffi::F32> slopes, ffi::Buffer<ffi::F32> sinks,
                      ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                      ffi::ResultBuffer<ffi::F32> v_out, int64_t ring, float soft_cap) {
  auto kd = k_cache.dimensions();
  if (kd.size() != 4 || v_cache.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("decode: caches must be [batch, heads, max_len, dim]");
  const long batch = kd[0], kv_heads = kd[1], max_len = kd[2], d = kd[3];
  const long dv = v_cache.dimensions()[3];
  const long heads = batch * d > 0 ? q.element_count() / (batch * d) : 0;
  if (d % kLanes || dv % kLanes || kv_heads <= 0 || heads % kv_heads ||
      q.element_count() != batch * heads * d || k_new.element_count() != batch * kv_heads * d ||
      v_new.element_count() != batch * kv_heads * dv ||
      v_cache.element_count() != batch * kv_heads * max_len * dv ||
      positions.element_count() != batch ||
      (slopes.element_count() != 0 && slopes.element_count() != heads) ||
      (sinks.element_count() != 0 && sinks.element_count() != heads))
    return ffi::Error::InvalidArgument("decode: inconsistent shapes");
  float* kc = k_out->typed_data();
  float* vc = v_out->typed_data();
  // XLA aliases the caches to the outputs; should it not, start from a copy.
  if (kc != k_cache.typed_data())
    std::memcpy(kc, k_cache.typed_data(), k_cache.element_count() * sizeof(float));
  if (vc != v_cache.typed_data())
    std::memcpy(vc, v_cache.typed_data(), v_cache.element_count() * sizeof(float));
  const int32_t* pos = positions.typed_data();
  const float* slope = slopes.element_count() ? slopes.typed_data() : nullptr;
  const float* sink = sinks.element_count() ? sinks.typed_data() : nullptr;
  const long group = heads / kv_heads;
  // Every write before any read: the rows of a group read the cache row one write fills.
  for (long kv_task = 0; kv_task < batch * kv_heads; ++kv_task) {
    long p = pos[kv_task / kv_heads];
    long slot = ring ? (p % max_len + max_len) % max_len : p;
    if (p >= 0 && slot < max_len) {
      std::memcpy(kc + (kv_task * max_len + slot) * d, k_new.typed_data() + kv_task * d,
                  d * sizeof(float));
      std::memcpy(vc + (kv_task * max_len + slot) * dv, v_new.typed_data() + kv_task * dv,
                  dv * sizeof(float));
    }
  }
  auto row = [&](long task) {
    long b = task / heads, h = task % heads;
    long p = pos[b];
    long kv_task = b * kv_heads + h / group;
    const float* k_row = kc + kv_task * max_len * d;
    const float* v_row = vc + kv_task * max_len * dv;
    long slot = ring ? (p % max_len + max_len) % max_len : p;
    // Ring: the keys of slots 0..n-1, at positions key_position(j).
    long n = p < 0 ? 0 : ring ? max_len : std::min(p + 1, max_len);
    auto key_position = [&](long j) {
      return ring ? p - ((slot - j) % max_len + max_len) % max_len : j;
    };
    float* o = out->typed_data() + task * dv;
    for (long e = 0; e < dv; ++e) o[e] = 0.0f;
    if (n == 0) return;
    // Logits padded to whole vectors with -inf, which exp turns into weight 0.
    long padded = (n + kLanes - 1) / kLanes * kLanes;
    thread_local std::vector<float> logits;
    logits.resize(padded);
    const float* qr = q.typed_data() + task * d;
    float largest = -kInf;
    // Four keys at a time: four independent chains of products keep the FMA units busy.
    long j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = k_row + j * d;
      vec a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
      for (long e = 0; e < d; e += kLanes) {
        vec qe = load(qr + e);
        a0 += qe * load(k0 + e);
        a1 += qe * load(k0 + d + e);
        a2 += qe * load(k0 + 2 * d + e);
        a3 += qe * load(k0 + 3 * d + e);
      }
      logits[j] = hsum(a0);
      logits[j + 1] = hsum(a1);
      logits[j + 2] = hsum(a2);
      logits[j + 3] = hsum(a3);
    }
    for (; j < n; ++j) {
      vec acc = splat(0.0f);
      for (long e = 0; e < d; e += kLanes) acc += load(qr + e) * load(k_row + j * d + e);
      logits[j] = hsum(acc);
    }
    // Capped before the unwritten ring slots become -inf. The lanes past n are overwritten below.
    if (soft_cap > 0.0f) apply_soft_cap(logits.data(), 1, padded, padded, soft_cap);
    bool any_nan = false;
    for (j = 0; j < n; ++j) {
      long at = key_position(j);
      float s = at < 0 ? -kInf : logits[j];  // a ring slot not written yet
      if (slope && at >= 0) s -= slope[h] * static_cast<float>(p - at);
      logits[j] = s;
      any_nan |= s != s;
      largest = s > largest ? s : largest;
    }
    if (any_nan) {  // a NaN logit makes the reference's whole row NaN
      for (long e = 0; e < dv; ++e) o[e] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    if (largest == -kInf) return;  // all logits -inf: zeros
    for (long j = n; j < padded; ++j) logits[j] = -kInf;
    vec shift = splat(largest), totals = splat(0.0f);
    bool finite = largest < kInf;
    for (long j = 0; j < padded; j += kLanes) {
      vec x = load(logits.data() + j) - shift;
      // A +inf logit makes its row NaN (inf - inf), as in the reference.
      vec w = finite ? vexp_nan(x) : x - x;
      store(logits.data() + j, w);
      totals += w;
    }
    float total = hsum(totals);
    // An unwritten ring slot has weight exp(-inf) = 0 and holds zeros (kv_cache.py writes
    // them so), so it adds nothing.
    switch (dv / kLanes) {
      case 1: weighted_sum<1>(logits.data(), v_row, n, o); break;
      case 2: weighted_sum<2>(logits.data(), v_row, n, o); break;
      case 4: weighted_sum<4>(logits.data(), v_row, n, o); break;
      case 8: weighted_sum<8>(logits.data(), v_row, n, o); break;
      default: weighted_sum_any(logits.data(), v_row, n, dv, o);
    }
    float factor = 1.0f / total;
    if (sink) {
      // The sink joins the denominator: with m = max(largest, sink), the weights relative to m
      // are rescale times those relative to largest. A NaN sink gives NaN.
      float m = sink[h] > largest ? sink[h] : largest;
      float rescale = std::exp(largest - m);
      factor = rescale / (total * rescale + std::exp(sink[h] - m));
    }
    vec inv = splat(factor);
    for (long e = 0; e < dv; e += kLanes) store(o + e, load(o + e) * inv);
  };
  long tasks = batch * heads;
  long longest = 0;
  for (long b = 0; b < batch; ++b) longest = std::max(longest, static_cast<long>(pos[b]) + 1);
  // Waking pool threads costs more than a short row: small steps run on the caller.
  if (tasks == 1 || tasks * std::min(longest, max_len) * (d + dv) < (3 << 18)) {
    for (long t = 0; t < tasks; ++t) row(t);
  } else {
    parallel_for(pool, tasks, row);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlockSparseForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_block
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mask_id
                                  .Arg<ffi::Buffer<ffi::U8>>()   // masks
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_segments
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_segments
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlockSparseBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_block
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mask_id
                                  .Arg<ffi::Buffer<ffi::U8>>()   // masks
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_segments
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_segments
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeStep, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::F32>>()  // slopes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sinks
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k_cache, in place
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_cache, in place
                                  .Attr<int64_t>("ring")
                                  .Attr<float>("soft_cap"));
