/*
 * cpu_team.h -- splitting a CPU call across the OpenMP team the host process already runs.
 */
#ifndef MOS_CPU_TEAM_H
#define MOS_CPU_TEAM_H

/* How many chunks to cut `rows` rows into: one per thread of the host's OpenMP team (its
 * omp_get_max_threads, which torch.set_num_threads sets), at least `min_rows` rows each; 1 when
 * the process has no OpenMP runtime loaded, when called inside a parallel region, or when
 * OpenBLAS runs threads of its own. */
int mos_cpu_team_chunks(long long rows, long long min_rows);

/* Runs fn(ctx, c) for every chunk c < chunks, on the host's team when there is one, else on the
 * calling thread; returns when all have run. Which thread runs which chunk is unspecified: fn
 * must write only what chunk c owns. */
void mos_cpu_team_run(void (*fn)(void *ctx, int chunk), void *ctx, int chunks);

#endif
