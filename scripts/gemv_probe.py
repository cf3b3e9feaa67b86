"""Which GEMM path is fastest for decode-sized (M <= 16) bf16 projections of a Llama-3.1-8B on
this GPU: cuBLASLt (torch default), cuBLAS, or a Triton split-K GEMV. Prints achieved GB/s."""

import torch
import triton
import triton.language as tl


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=rn[:, None] < N, other=0.0)
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * K + rk, mask=m < M, other=0.0)
            part = tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
            acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_gemv(x, w, block_n, block_k, warps, stages):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm = 1 if M == 1 else triton.next_power_of_2(M)
    gemv_kernel[(triton.cdiv(N, block_n),)](x, w, y, M, N, K, BLOCK_N=block_n, BLOCK_K=block_k,
                                            BLOCK_M=bm, num_warps=warps, num_stages=stages)
    return y


def bench(fn, reps=200):
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
print(f"{'shape':8s} {'M':>3s} {'lt GB/s':>8s} {'cublas':>8s} {'triton':>8s} best-config")
for name, (n, k) in shapes.items():
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(3)]
    for m in (1, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gb = n * k * 2 / 1e9
        res = {}
        for lib in ("cublaslt", "cublas"):
            torch.backends.cuda.preferred_blas_library(lib)
            i = [0]

            def f():
                i[0] = (i[0] + 1) % 3
                return torch.nn.functional.linear(x, ws[i[0]])
            res[lib] = gb / (bench(f) * 1e-3)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        ref = torch.nn.functional.linear(x.float(), ws[0].float())
        best, cfg = 0.0, None
        for bn in (4, 8, 16):
            for bk in (512, 1024):
                for warps in (4, 8):
                    for stages in (3, 4):
                        try:
                            out = triton_gemv(x, ws[0], bn, bk, warps, stages)
                            err = (out.float() - ref).norm() / ref.norm()
                            if err > 1e-2:
                                continue
                            t = bench(lambda: triton_gemv(x, ws[1], bn, bk, warps, stages), 50)
                        except Exception:
                            continue
                        if gb / (t * 1e-3) > best:
                            best, cfg = gb / (t * 1e-3), (bn, bk, warps, stages)
        print(f"{name:8s} {m:3d} {res['cublaslt']:8.0f} {res['cublas']:8.0f} {best:8.0f} {cfg}", flush=True)
