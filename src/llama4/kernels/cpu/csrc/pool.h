/* The kernels' parallel loops: a small pool of worker threads that claim a loop's items one at a time from a
 * shared counter, the calling thread working too. A loop ends when its items are done, not when every
 * thread has turned up: a worker that the OS has not scheduled (other processes on the cores) simply finds
 * nothing left, where an OpenMP team would hold every loop until it arrives (measured: decode collapsed
 * ~30x on a loaded 2-core machine). Workers spin briefly for the next loop (a decode step's loops follow
 * each other within microseconds), then sleep on a condition variable.
 *
 * One pool per library; calls come from one thread at a time (the model's), as torch's own pool assumes.
 */
#ifndef LLAMA4_POOL_H
#define LLAMA4_POOL_H

#include <stdint.h>

typedef void (*pool_task)(void *ctx, int64_t item, int thread);

/* task(ctx, item, thread) for item 0..items-1 on up to `threads` threads (thread 0 is the caller; each
 * thread's index is below `threads`, for per-thread scratch). Returns when every item is done. */
void llama4_pool_parallel(int64_t items, int threads, pool_task task, void *ctx);

/* Keeps the started workers polling for the next loop for `ns` nanoseconds from now (waking those asleep), where
 * the caller knows one follows soon after a gap longer than their usual poll (the Python between a decode step's
 * layers, or before its first): a worker woken from its sleep only when the loop starts joins it late. */
void llama4_pool_warm(int64_t ns);

#endif
