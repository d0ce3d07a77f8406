// A small CPU emulator of the CUDA features the varlen attention kernels use, so that the kernel
// source (csrc/attention/*.cuh, compiled with -DUNIREF_ATTN_EMULATE) runs on a machine without a
// GPU. It checks index math, masking, the cp.async pipeline and the barriers -- not speed.
//
// Model: one block at a time; each CUDA thread is a fiber (ucontext) with its own stack. Fibers run
// until they reach a barrier or a warp collective, then the scheduler resumes a random runnable
// fiber (seeded), so the interleaving of warps between barriers varies from run to run.
//  - __syncthreads: all threads of the block must arrive; a thread that exits while others wait
//    (a divergent barrier) is reported as a deadlock.
//  - warp collectives (mma.sync, ldmatrix, shfl): every lane deposits its operands, waits for its
//    32 lanes, and computes its result with the PTX ISA's fragment layouts. A lane that reaches a
//    different collective than its warp-mates is reported.
//  - cp.async: "eager" mode copies at issue (earliest completion), "lazy" mode copies when the
//    issuing thread's cp.async.wait_group retires the group (latest completion). A read before
//    the wait + barrier sees stale data in lazy mode; a write into a buffer another warp still reads
//    corrupts it in eager mode. Source ranges are checked against the registered global buffers,
//    shared addresses against the block's dynamic shared memory, alignments against the PTX rules.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <type_traits>
#include <vector>

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace uniref_emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "EMULATOR ERROR: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::exit(3);
}

struct Options {
  bool eager_copies = false;
  uint64_t seed = 1;
};
inline Options g_options;

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
  bool zero_fill;
};

struct Fiber {
  ucontext_t ctx;
  int tid = 0;
  bool done = false;
  bool waiting = false;
  uint64_t warp_seq = 0;  // collectives executed by this lane
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> committed;
};

struct Barrier {
  int expected = 0;
  int arrived = 0;
  std::vector<int> waiters;
};

enum Op : int { kNone = 0, kShfl = 1, kLdsm = 2, kLdsmT = 3, kMmaF16 = 4, kMmaBf16 = 5 };

struct WarpSlots {  // double-buffered by collective parity
  int op[2][32];
  uint32_t addr[2][32];
  float f[2][32];
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
  float c[2][32][4];
  bool computed[2];
  float d[2][32][4];
};

struct Range {
  const unsigned char* lo;
  const unsigned char* hi;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  std::vector<WarpSlots> slots;
  std::vector<unsigned char> smem;
  int current = -1;
  std::function<void()> body;
};

inline BlockRun* g_block = nullptr;
inline std::vector<Range> g_globals;
inline std::vector<std::vector<char>> g_stacks;
inline std::mt19937_64 g_rng;
inline uint3 g_threadIdx, g_blockIdx;
inline dim3 g_blockDim, g_gridDim;
inline uint64_t g_switches = 0;
constexpr size_t kStackBytes = 256 * 1024;

inline void register_global(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  g_globals.push_back({c, c + bytes});
}
inline void clear_globals() { g_globals.clear(); }

inline Fiber& me() { return g_block->fibers[g_block->current]; }

inline void yield_to_scheduler() {
  Fiber& f = me();
  ++g_switches;
  if (swapcontext(&f.ctx, &g_block->sched) != 0) fail("swapcontext");
}

inline void barrier_wait(Barrier& bar) {
  Fiber& f = me();
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    for (int w : bar.waiters) g_block->fibers[w].waiting = false;
    bar.waiters.clear();
    yield_to_scheduler();  // stay runnable; lets the scheduler pick someone at random
  } else {
    f.waiting = true;
    bar.waiters.push_back(f.tid);
    yield_to_scheduler();  // resumed once the last thread arrives
  }
}

inline void perform(const Copy& c) {
  if (c.zero_fill)
    std::memset(c.dst, 0, c.bytes);
  else
    std::memcpy(c.dst, c.src, c.bytes);
}

inline void drain_all(Fiber& f) {
  for (auto& g : f.committed)
    for (auto& c : g) perform(c);
  f.committed.clear();
  for (auto& c : f.open_group) perform(c);
  f.open_group.clear();
}

inline void fiber_entry() {
  g_block->body();
  Fiber& f = me();
  drain_all(f);  // copies complete eventually even if nobody waits for them
  f.done = true;
  // returning resumes uc_link (the scheduler)
}

// Runs one block: blockDim.x threads (1-D blocks only), `smem_bytes` of dynamic shared memory.
inline void run_block(int threads, size_t smem_bytes, const std::function<void()>& body) {
  if (threads % 32 != 0) fail("block size must be a multiple of 32");
  BlockRun run;
  run.body = body;
  run.fibers.resize(threads);
  run.block_bar.expected = threads;
  run.warp_bars.resize(threads / 32);
  for (auto& w : run.warp_bars) w.expected = 32;
  run.slots.resize(threads / 32);
  std::memset(run.slots.data(), 0, run.slots.size() * sizeof(WarpSlots));
  // Shared memory starts as garbage: a kernel that reads what it never wrote sees NaN-ish bytes.
  run.smem.assign(smem_bytes, 0xFF);
  g_block = &run;
  while (g_stacks.size() < static_cast<size_t>(threads)) g_stacks.emplace_back(kStackBytes);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = run.fibers[i];
    f.tid = i;
    if (getcontext(&f.ctx) != 0) fail("getcontext");
    f.ctx.uc_stack.ss_sp = g_stacks[i].data();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &run.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> runnable;
  for (;;) {
    runnable.clear();
    bool all_done = true;
    for (auto& f : run.fibers) {
      if (!f.done) all_done = false;
      if (!f.done && !f.waiting) runnable.push_back(f.tid);
    }
    if (all_done) break;
    if (runnable.empty())
      fail("deadlock in block (%u,%u,%u): some threads wait at a barrier that others never reach "
           "(divergent __syncthreads / early exit, or a warp collective with missing lanes)",
           g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
    const int pick = runnable[g_rng() % runnable.size()];
    run.current = pick;
    g_threadIdx = make_uint3(pick, 0, 0);
    ++g_switches;
    if (swapcontext(&run.sched, &run.fibers[pick].ctx) != 0) fail("swapcontext");
  }
  g_block = nullptr;
}

template <typename Body>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Body&& body) {
  if (block.y != 1 || block.z != 1) fail("1-D blocks only");
  g_gridDim = grid;
  g_blockDim = block;
  g_rng.seed(g_options.seed);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_blockIdx = make_uint3(x, y, z);
        run_block(static_cast<int>(block.x), smem_bytes, std::function<void()>(body));
      }
}

// ---- memory helpers ----------------------------------------------------------------------------
inline unsigned char* smem_base() { return g_block->smem.data(); }

inline unsigned char* smem_ptr(uint32_t addr, int bytes, int align) {
  if (addr % align != 0) fail("shared address %u not %d-byte aligned", addr, align);
  if (static_cast<size_t>(addr) + bytes > g_block->smem.size())
    fail("shared access [%u, %u) beyond the %zu bytes of dynamic shared memory", addr, addr + bytes,
         g_block->smem.size());
  return smem_base() + addr;
}

inline void check_global(const void* p, int bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const Range& r : g_globals)
    if (c >= r.lo && c + bytes <= r.hi) return;
  fail("global read of %d bytes at %p outside every registered buffer", bytes, p);
}

// ---- warp collectives ----------------------------------------------------------------------------
struct Lane {
  int lane, warp, par;
  WarpSlots* s;
};

inline Lane enter(int op) {
  Fiber& f = me();
  Lane l{f.tid % 32, f.tid / 32, static_cast<int>(f.warp_seq++ & 1), &g_block->slots[f.tid / 32]};
  l.s->op[l.par][l.lane] = op;
  l.s->computed[l.par] = false;
  return l;
}

inline void arrive(const Lane& l) {
  barrier_wait(g_block->warp_bars[l.warp]);
  const int op = l.s->op[l.par][l.lane];
  for (int i = 0; i < 32; ++i)
    if (l.s->op[l.par][i] != op)
      fail("warp %d: lanes %d and %d reached different collectives (%d vs %d)", l.warp, l.lane, i, op,
           l.s->op[l.par][i]);
}

inline float bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}

}  // namespace uniref_emu

#define threadIdx (::uniref_emu::g_threadIdx)
#define blockIdx (::uniref_emu::g_blockIdx)
#define blockDim (::uniref_emu::g_blockDim)
#define gridDim (::uniref_emu::g_gridDim)

inline void __syncthreads() { uniref_emu::barrier_wait(uniref_emu::g_block->block_bar); }
inline void __syncwarp() {
  uniref_emu::Fiber& f = uniref_emu::me();
  uniref_emu::barrier_wait(uniref_emu::g_block->warp_bars[f.tid / 32]);
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

namespace uniref {
namespace attn {

inline uint32_t smem_u32(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = uniref_emu::smem_base();
  if (c < base || c > base + uniref_emu::g_block->smem.size()) uniref_emu::fail("smem_u32 of a non-shared pointer");
  return static_cast<uint32_t>(c - base);
}

inline float fast_exp2(float x) { return exp2f(x); }

inline float shfl_xor(float v, int lane_mask) {
  using namespace uniref_emu;
  Lane l = enter(kShfl);
  l.s->f[l.par][l.lane] = v;
  arrive(l);
  return l.s->f[l.par][l.lane ^ lane_mask];
}

// ldmatrix.m8n8.x4(.trans).b16: lanes 8i..8i+7 address the rows of matrix i.
inline void ldmatrix_common(uint32_t (&r)[4], uint32_t addr, bool trans) {
  using namespace uniref_emu;
  Lane l = enter(trans ? kLdsmT : kLdsm);
  l.s->addr[l.par][l.lane] = addr;
  arrive(l);
  const int lane = l.lane;
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      int row, col;
      if (!trans) {
        row = lane / 4;
        col = 2 * (lane % 4) + k;
      } else {
        row = 2 * (lane % 4) + k;
        col = lane / 4;
      }
      const unsigned char* p = smem_ptr(l.s->addr[l.par][8 * i + row], 16, 16);
      std::memcpy(&e[k], p + 2 * col, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_common(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_common(r, addr, true); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: lane l = 4g + t holds
// A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
// B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g); C/D: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace uniref_emu;
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  Lane l = enter(bf16 ? kMmaBf16 : kMmaF16);
  for (int i = 0; i < 4; ++i) {
    l.s->a[l.par][l.lane][i] = a[i];
    l.s->c[l.par][l.lane][i] = d[i];
  }
  l.s->b[l.par][l.lane][0] = b0;
  l.s->b[l.par][l.lane][1] = b1;
  arrive(l);
  WarpSlots& s = *l.s;
  const int par = l.par;
  if (!s.computed[par]) {
    double A[16][16], B[16][8], C[16][8];
    auto lo = [](uint32_t x) { return static_cast<uint16_t>(x & 0xFFFF); };
    auto hi = [](uint32_t x) { return static_cast<uint16_t>(x >> 16); };
    for (int ln = 0; ln < 32; ++ln) {
      const int g = ln / 4, t = ln % 4;
      const uint32_t* ar = s.a[par][ln];
      const int rows[4] = {g, g + 8, g, g + 8};
      const int cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int i = 0; i < 4; ++i) {
        A[rows[i]][cols[i]] = bits_to_float(lo(ar[i]), bf16);
        A[rows[i]][cols[i] + 1] = bits_to_float(hi(ar[i]), bf16);
      }
      const uint32_t* br = s.b[par][ln];
      B[2 * t][g] = bits_to_float(lo(br[0]), bf16);
      B[2 * t + 1][g] = bits_to_float(hi(br[0]), bf16);
      B[2 * t + 8][g] = bits_to_float(lo(br[1]), bf16);
      B[2 * t + 9][g] = bits_to_float(hi(br[1]), bf16);
      const float* cr = s.c[par][ln];
      C[g][2 * t] = cr[0];
      C[g][2 * t + 1] = cr[1];
      C[g + 8][2 * t] = cr[2];
      C[g + 8][2 * t + 1] = cr[3];
    }
    for (int ln = 0; ln < 32; ++ln) {
      const int g = ln / 4, t = ln % 4;
      const int rr[4] = {g, g, g + 8, g + 8};
      const int cc[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int i = 0; i < 4; ++i) {
        double acc = C[rr[i]][cc[i]];
        for (int k = 0; k < 16; ++k) acc += A[rr[i]][k] * B[k][cc[i]];
        s.d[par][ln][i] = static_cast<float>(acc);
      }
    }
    s.computed[par] = true;
  }
  for (int i = 0; i < 4; ++i) d[i] = s.d[par][l.lane][i];
}

inline void cp_async_generic(uint32_t smem_addr, const void* gmem, bool pred, int bytes) {
  using namespace uniref_emu;
  Fiber& f = me();
  unsigned char* dst = smem_ptr(smem_addr, bytes, bytes);
  if (reinterpret_cast<uintptr_t>(gmem) % bytes != 0) fail("cp.async global source not %d-byte aligned", bytes);
  if (pred) check_global(gmem, bytes);
  const Copy c{dst, static_cast<const unsigned char*>(gmem), bytes, !pred};
  if (g_options.eager_copies)
    perform(c);
  else
    f.open_group.push_back(c);
}
inline void cp_async_16(uint32_t smem_addr, const void* gmem, bool pred) { cp_async_generic(smem_addr, gmem, pred, 16); }
inline void cp_async_4(uint32_t smem_addr, const void* gmem, bool pred) { cp_async_generic(smem_addr, gmem, pred, 4); }

inline void cp_async_commit() {
  uniref_emu::Fiber& f = uniref_emu::me();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

template <int N>
inline void cp_async_wait() {
  uniref_emu::Fiber& f = uniref_emu::me();
  while (f.committed.size() > static_cast<size_t>(N)) {
    for (auto& c : f.committed.front()) uniref_emu::perform(c);
    f.committed.pop_front();
  }
}

}  // namespace attn
}  // namespace uniref
