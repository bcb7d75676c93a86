/* The pool of pool.h (one per library). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "pool.h"

#define POOL_MAX_THREADS 256
/* How long an idle worker polls for the next loop before it sleeps: shorter cost unloaded decode, longer
 * cost decode beside other processes (bench/generate.py --sections load). */
#define POOL_SPIN_NS 20000

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int workers; /* started so far (threads 1..workers; the caller is thread 0) */
    _Atomic int64_t generation, finished;
    _Atomic int sleepers, inside;
    _Atomic int64_t next, done;
    _Atomic int64_t warm_until, alerts; /* llama4_pool_warm: spin until then; bumped to wake sleepers */
    pool_task task;
    void *ctx;
    int64_t items;
    int threads;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

static inline int64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void pool_run_items(int thread) {
    for (;;) {
        const int64_t item = atomic_fetch_add(&pool.next, 1);
        if (item >= pool.items) return;
        pool.task(pool.ctx, item, thread);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *pool_worker(void *arg) {
    const int thread = (int)(intptr_t)arg;
    int64_t seen = atomic_load(&pool.generation);
    for (;;) {
        int64_t current;
        for (;;) { /* spin for POOL_SPIN_NS or until warm_until, then sleep until a loop or an alert comes */
            const int64_t alerts = atomic_load(&pool.alerts), spin = pool_now_ns() + POOL_SPIN_NS;
            current = atomic_load(&pool.generation);
            while (current == seen) {
                const int64_t warm = atomic_load_explicit(&pool.warm_until, memory_order_relaxed);
                if (pool_now_ns() >= (warm > spin ? warm : spin)) break;
                for (int i = 0; i < 64; i++) __builtin_ia32_pause();
                current = atomic_load(&pool.generation);
            }
            if (current != seen) break;
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((current = atomic_load(&pool.generation)) == seen && atomic_load(&pool.alerts) == alerts)
                pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.lock);
            if (current != seen) break;
        }
        seen = current;
        /* Enter the loop only while it runs: the caller marks it finished, then waits for those inside
         * to leave before it reuses the loop's fields (both sides seq_cst: one of them sees the other). */
        atomic_fetch_add(&pool.inside, 1);
        if (atomic_load(&pool.generation) == seen && atomic_load(&pool.finished) != seen && thread < pool.threads)
            pool_run_items(thread);
        atomic_fetch_sub(&pool.inside, 1);
    }
    return NULL;
}

void llama4_pool_warm(int64_t ns) {
    atomic_store(&pool.warm_until, pool_now_ns() + ns);
    atomic_fetch_add(&pool.alerts, 1);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
}

/* A forked child has none of the parent's workers: it starts its own when it first needs them. */
static void pool_forget_workers(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.inside, 0);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_forget_workers); }

void llama4_pool_parallel(int64_t items, int threads, pool_task task, void *ctx) {
    if (threads > items) threads = (int)items;
    if (threads > POOL_MAX_THREADS) threads = POOL_MAX_THREADS;
    if (threads <= 1) {
        for (int64_t item = 0; item < items; item++) task(ctx, item, 0);
        return;
    }
    static pthread_once_t registered = PTHREAD_ONCE_INIT;
    pthread_once(&registered, register_fork_handler);
    while (pool.workers < threads - 1) { /* grown on demand, never shrunk; without threads, run alone */
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&id, &attr, pool_worker, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    if (threads > pool.workers + 1) threads = pool.workers + 1;
    pool.task = task;
    pool.ctx = ctx;
    pool.items = items;
    pool.threads = threads;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, 0);
    const int64_t generation = atomic_fetch_add(&pool.generation, 1) + 1;
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    pool_run_items(0);
    for (const int64_t until = pool_now_ns() + POOL_SPIN_NS; atomic_load_explicit(&pool.done, memory_order_acquire) < items;) {
        if (pool_now_ns() < until) /* a worker still on its last item: if the OS took its core, give way */
            for (int i = 0; i < 16; i++) __builtin_ia32_pause();
        else
            sched_yield();
    }
    atomic_store(&pool.finished, generation);
    while (atomic_load(&pool.inside) > 0) __builtin_ia32_pause();
}
