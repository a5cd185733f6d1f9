/* Stand-in for libcublas.so.12, used ONLY to run the GPU check on a lent machine whose image has
 * CUDA 13 libraries while PyPI's faiss-gpu is built against CUDA 12 (the real cuBLAS 12 wheels are
 * far over the 64 MiB that can be carried there). libfaiss.so links 8 cuBLAS functions; binary
 * indexes (GpuIndexBinaryFlat) never call the GEMMs, so handles are faked and every GEMM fails loudly.
 * Build: gcc -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script=cublas_stub.map \
 *        -o libcublas.so.12 cublas_stub.c */
#include <stdio.h>
#include <stdlib.h>

#define NOT_SUPPORTED 15

static int fail(const char *name) {
    fprintf(stderr, "cublas_stub: %s called; this stand-in supports binary indexes only\n", name);
    return NOT_SUPPORTED;
}

int cublasCreate_v2(void **handle) { *handle = (void *)0x1; return 0; }
int cublasDestroy_v2(void *handle) { (void)handle; return 0; }
int cublasSetStream_v2(void *handle, void *stream) { (void)handle; (void)stream; return 0; }
int cublasGetMathMode(void *handle, int *mode) { (void)handle; *mode = 0; return 0; }
int cublasSetMathMode(void *handle, int mode) { (void)handle; (void)mode; return 0; }
int cublasGemmEx(void) { return fail("cublasGemmEx"); }
int cublasGemmStridedBatchedEx(void) { return fail("cublasGemmStridedBatchedEx"); }
int cublasSgemmEx(void) { return fail("cublasSgemmEx"); }
