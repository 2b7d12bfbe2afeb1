/* xxh3 entry points for fastcache: on x86-64, libxxhash's runtime-dispatched variants
 * (SSE2 / AVX2 / AVX-512, chosen once per process by CPUID); elsewhere the plain ones.
 * Debian's libxxhash exports both; the results are identical, only the speed differs. */
#ifndef FC_XXHASH_H
#define FC_XXHASH_H

#include <xxhash.h>

#if defined(__x86_64__) && !defined(FASTCACHE_NO_XXH_DISPATCH)
#include <xxh_x86dispatch.h>
#define fc_xxh3_64(p, n) XXH3_64bits_dispatch((p), (n))
#define fc_xxh3_128(p, n) XXH3_128bits_dispatch((p), (n))
#else
#define fc_xxh3_64(p, n) XXH3_64bits((p), (n))
#define fc_xxh3_128(p, n) XXH3_128bits((p), (n))
#endif

#endif
