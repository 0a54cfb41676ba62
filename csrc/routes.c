/*
 * routes.c -- the fixed random index tables of MoS (subset selection, pair dissociation,
 * shard privatization) and the validation of a pool's shape.
 *
 * The PRNG is specified here so any language can reproduce a table bit for bit:
 *   mix(z)    = SplitMix64's finalizer: z ^= z >> 30; z *= 0xbf58476d1ce4e5b9;
 *               z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31.
 *   key       = fold(seed, fnv1a64(pool_name), layer, side), where fold starts from s = seed and,
 *               for each further value v, sets s = mix(s + GOLDEN) ^ v; key = mix(s + GOLDEN),
 *               GOLDEN = 0x9e3779b97f4a7c15 (all arithmetic modulo 2^64).
 *   stream    = SplitMix64 seeded with key: state += GOLDEN; return mix(state).
 *   below(n)  = rejection sampling: draw u until u >= (2^64 - n) mod n, return u mod n (unbiased).
 *   sample    = partial Fisher-Yates over [0, N_pub): for i < k, j = i + below(N_pub - i),
 *               swap(perm[i], perm[j]), emit perm[i].
 */
#include <stdlib.h>

#include "check.h"

#define GOLDEN UINT64_C(0x9e3779b97f4a7c15)

static uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= UINT64_C(0xbf58476d1ce4e5b9);
    z ^= z >> 27;
    z *= UINT64_C(0x94d049bb133111eb);
    z ^= z >> 31;
    return z;
}

static uint64_t fnv1a64(const char *text) {
    uint64_t hash = UINT64_C(0xcbf29ce484222325);
    for (const unsigned char *c = (const unsigned char *)text; *c; ++c) {
        hash ^= *c;
        hash *= UINT64_C(0x100000001b3);
    }
    return hash;
}

uint64_t mos_route_key(uint64_t seed, const char *pool_name, int64_t layer, mos_side side) {
    uint64_t s = seed;
    s = mix64(s + GOLDEN) ^ fnv1a64(pool_name ? pool_name : "");
    s = mix64(s + GOLDEN) ^ (uint64_t)layer;
    s = mix64(s + GOLDEN) ^ (uint64_t)side;
    return mix64(s + GOLDEN);
}

static uint64_t next_u64(uint64_t *state) {
    *state += GOLDEN;
    return mix64(*state);
}

static uint64_t below(uint64_t *state, uint64_t n) {
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t u = next_u64(state);
        if (u >= threshold) return u % n;
    }
}

mos_status mos_pool_shape_validate(mos_pool_shape *s) {
    MOS_CHECK(s->d_in >= 1, MOS_ERR_VALUE, "d_in must be >= 1, got %lld", (long long)s->d_in);
    MOS_CHECK(s->d_out >= 1, MOS_ERR_VALUE, "d_out must be >= 1, got %lld", (long long)s->d_out);
    MOS_CHECK(s->n_layers >= 1, MOS_ERR_VALUE, "n_layers must be >= 1, got %lld",
              (long long)s->n_layers);
    MOS_CHECK(s->rank >= 1, MOS_ERR_VALUE, "r must be >= 1, got %lld", (long long)s->rank);
    MOS_CHECK(s->equivalent_rank >= 1, MOS_ERR_VALUE, "equivalent_rank must be >= 1, got %lld",
              (long long)s->equivalent_rank);
    MOS_CHECK(s->shards_per_vector >= 1, MOS_ERR_VALUE,
              "shards_per_vector must be >= 1, got %lld", (long long)s->shards_per_vector);
    MOS_CHECK(s->private_rank >= 0 && s->private_rank <= s->equivalent_rank, MOS_ERR_VALUE,
              "private_rank must be in [0, equivalent_rank=%lld], got %lld",
              (long long)s->equivalent_rank, (long long)s->private_rank);
    MOS_CHECK(s->private_rank <= s->rank, MOS_ERR_VALUE,
              "private_rank must be <= r=%lld, got %lld", (long long)s->rank,
              (long long)s->private_rank);
    const int64_t l = s->shards_per_vector;
    MOS_CHECK(s->d_in % l == 0, MOS_ERR_VALUE,
              "shards_per_vector=%lld must divide d_in=%lld", (long long)l, (long long)s->d_in);
    MOS_CHECK(s->d_out % l == 0, MOS_ERR_VALUE,
              "shards_per_vector=%lld must divide d_out=%lld", (long long)l, (long long)s->d_out);
    /* Bound every product so the int32 index tables and int64 sizes cannot overflow. */
    MOS_CHECK(s->equivalent_rank <= INT32_MAX / s->n_layers / l &&
                  s->rank <= INT32_MAX / l,
              MOS_ERR_VALUE, "equivalent_rank * n_layers * shards_per_vector must fit in int32");
    s->n_shards = s->equivalent_rank * s->n_layers * l;
    s->n_public = (s->equivalent_rank - s->private_rank) * s->n_layers * l;
    s->shard_len_a = s->d_in / l;
    s->shard_len_b = s->d_out / l;
    const int64_t n_pick = (s->rank - s->private_rank) * l;
    if (s->subset_selection) {
        MOS_CHECK(n_pick <= s->n_public, MOS_ERR_VALUE,
                  "(r - private_rank) * shards_per_vector = %lld must be <= public shards "
                  "(equivalent_rank - private_rank) * n_layers * shards_per_vector = %lld",
                  (long long)n_pick, (long long)s->n_public);
    } else {
        MOS_CHECK(n_pick == s->n_public, MOS_ERR_VALUE,
                  "without subset_selection r must equal public shards / shards_per_vector + "
                  "private_rank = %lld, got r=%lld",
                  (long long)(s->n_public / l + s->private_rank), (long long)s->rank);
    }
    return MOS_OK;
}

mos_status mos_route_indices(int32_t *out, const mos_pool_shape *shape, uint64_t seed,
                             const char *pool_name, int64_t layer, mos_side side) {
    mos_pool_shape s = *shape;
    MOS_TRY(mos_pool_shape_validate(&s));
    MOS_CHECK(layer >= 0 && layer < s.n_layers, MOS_ERR_VALUE,
              "layer must be in [0, n_layers=%lld), got %lld", (long long)s.n_layers,
              (long long)layer);
    MOS_CHECK(side == MOS_SIDE_A || side == MOS_SIDE_B, MOS_ERR_VALUE, "side must be 0 (A) or 1 (B)");
    const int64_t l = s.shards_per_vector;
    const int64_t n_pick = (s.rank - s.private_rank) * l;
    const int64_t n_private = s.private_rank * l;

    if (!s.subset_selection) {
        for (int64_t i = 0; i < n_pick; ++i) out[i] = (int32_t)i;
    } else if (n_pick > 0) {
        int32_t *perm = malloc((size_t)s.n_public * sizeof *perm);
        MOS_CHECK(perm != NULL, MOS_ERR_NOMEM, "cannot allocate a permutation of %lld public rows",
                  (long long)s.n_public);
        for (int64_t i = 0; i < s.n_public; ++i) perm[i] = (int32_t)i;
        uint64_t state = mos_route_key(seed, pool_name, layer, side);
        for (int64_t i = 0; i < n_pick; ++i) {
            int64_t j = i + (int64_t)below(&state, (uint64_t)(s.n_public - i));
            int32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
            out[i] = perm[i];
        }
        free(perm);
    }
    const int64_t private_start = s.n_public + layer * n_private;
    for (int64_t i = 0; i < n_private; ++i) out[n_pick + i] = (int32_t)(private_start + i);
    return MOS_OK;
}
