/*
 * cpu_team.c -- the assembled CPU path cuts large calls into row chunks and runs them on the
 * OpenMP team the process already has: PyTorch's, whose libgomp is loaded with global symbols.
 * It is found by name at run time, never linked, so the core brings no runtime of its own.
 *
 * Why not a pool of our own (OpenBLAS's threads, or a second OpenMP runtime): after every op,
 * torch's idle workers spin for milliseconds waiting for the next one, and a second pool's threads
 * then fight them for the same cores. One training step of a 30-layer model measured 5.5 s with
 * OpenBLAS on 2 threads against 0.7 s single-threaded, on 2 cores. Work handed to torch's own
 * team lands on the spinning workers instead.
 *
 * GOMP_parallel and the omp_* queries are GNU libgomp's ABI (GCC >= 4.9), which LLVM's and
 * Intel's OpenMP runtimes also export.
 */
#if !defined(_WIN32)
#define _GNU_SOURCE
#include <dlfcn.h>
#endif
#include <stdatomic.h>
#include <stddef.h>

#include "cpu_team.h"
#include "mos.h"

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_query_fn)(void);

/* Resolved once found; looked up again on later calls until then (torch may be imported after
 * the core's first call). Each pointer is published atomically, so concurrent lookups are safe. */
static _Atomic(void *) found_parallel, found_max_threads, found_num_threads, found_thread_num,
    found_in_parallel;

static void *lookup(_Atomic(void *) *slot, const char *name) {
    void *fn = atomic_load_explicit(slot, memory_order_acquire);
#if !defined(_WIN32)
    if (fn == NULL) {
        fn = dlsym(RTLD_DEFAULT, name);
        if (fn != NULL) atomic_store_explicit(slot, fn, memory_order_release);
    }
#else
    (void)name;
#endif
    return fn;
}

typedef struct {
    gomp_parallel_fn parallel;
    omp_query_fn max_threads, num_threads, thread_num, in_parallel;
} omp_runtime;

static int find_runtime(omp_runtime *rt) {
    /* Cast through a union: ISO C has no conversion between object and function pointers. */
    union { void *object; gomp_parallel_fn parallel; omp_query_fn query; } u;
    if ((u.object = lookup(&found_parallel, "GOMP_parallel")) == NULL) return 0;
    rt->parallel = u.parallel;
    if ((u.object = lookup(&found_max_threads, "omp_get_max_threads")) == NULL) return 0;
    rt->max_threads = u.query;
    if ((u.object = lookup(&found_num_threads, "omp_get_num_threads")) == NULL) return 0;
    rt->num_threads = u.query;
    if ((u.object = lookup(&found_thread_num, "omp_get_thread_num")) == NULL) return 0;
    rt->thread_num = u.query;
    if ((u.object = lookup(&found_in_parallel, "omp_in_parallel")) == NULL) return 0;
    rt->in_parallel = u.query;
    return 1;
}

/* A bound that keeps the chunk count (and the per-chunk scratch some callers allocate) small. */
#define MOS_TEAM_MAX_CHUNKS 64

int mos_cpu_team_chunks(long long rows, long long min_rows) {
    omp_runtime rt;
    if (min_rows < 1) min_rows = 1;
    if (rows < 2 * min_rows || mos_cpu_get_num_threads() != 1 || !find_runtime(&rt) ||
        rt.in_parallel())
        return 1;
    long long chunks = rt.max_threads();
    if (chunks > rows / min_rows) chunks = rows / min_rows;
    if (chunks > MOS_TEAM_MAX_CHUNKS) chunks = MOS_TEAM_MAX_CHUNKS;
    return chunks < 1 ? 1 : (int)chunks;
}

typedef struct {
    void (*fn)(void *, int);
    void *ctx;
    int chunks;
    omp_query_fn num_threads, thread_num;
} team_job;

/* Every team thread takes chunks thread_num, thread_num + team size, ...: the team may be smaller
 * than asked for, and each chunk still runs exactly once. */
static void team_body(void *arg) {
    const team_job *job = arg;
    const int team = job->num_threads(), me = job->thread_num();
    for (int c = me; c < job->chunks; c += team) job->fn(job->ctx, c);
}

void mos_cpu_team_run(void (*fn)(void *ctx, int chunk), void *ctx, int chunks) {
    omp_runtime rt;
    if (chunks > 1 && find_runtime(&rt)) {
        team_job job = {fn, ctx, chunks, rt.num_threads, rt.thread_num};
        rt.parallel(team_body, &job, (unsigned)chunks, 0);
        return;
    }
    for (int c = 0; c < chunks; ++c) fn(ctx, c);
}
