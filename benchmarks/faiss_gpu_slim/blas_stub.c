/* Stand-in for the OpenBLAS bundled in the faiss-gpu wheel, used ONLY by the GPU check on the lent
 * machine, to fit faiss-gpu into the 64 MiB that can be carried there. Binary indexes never call
 * BLAS/LAPACK (only float indexes, k-means and PCA do); any call aborts with a message.
 * Build: gcc -shared -fPIC -Wl,-soname,libopenblaso-r0-d77a1985.3.15.so -o <that name> blas_stub.c */
#include <stdio.h>
#include <stdlib.h>

#define STUB(name) void name(void) { fprintf(stderr, "blas_stub: " #name " called\n"); abort(); }
STUB(dgemm_) STUB(dgesvd_) STUB(dgetrf_) STUB(dgetri_) STUB(dsyev_) STUB(sgelsd_) STUB(sgemm_)
STUB(sgemv_) STUB(sgeqrf_) STUB(sgesvd_) STUB(sgetrf_) STUB(sgetri_) STUB(sorgqr_) STUB(ssyrk_)
