/*
 * bs_guard: a read past the end of a memory-mapped catalog reads zeros instead of killing the process.
 *
 * LMDB maps data.mdb; py-lmdb touches every page of a value it returns (its "preload") before the
 * caller can check the value's length. A damaged LMDB page can give a value a length that runs past
 * the end of the file, and touching a mapped page past EOF is SIGBUS (mmap(2)). The handler below
 * maps an anonymous zero page over the faulting page when the address lies in a range registered
 * with bs_guard_add (the catalog's map) and returns: the read is retried, gets zeros, and the
 * value's checksum then fails, so the caller sees damage, not a dead process. bs_guard_faults counts
 * such repairs, so the catalog's owner knows to close that map (munmap drops the zero pages too).
 * A fault anywhere else goes to the handler that was installed before (or the default: death).
 *
 * bs_guard_abort_exit is the CLI's last resort for LMDB's assertions (mdb_assert_fail prints its
 * message to stdio's stderr and calls abort() on some damaged pages): stdio's stderr is pointed at a
 * buffer, and SIGABRT writes one line, the caller's message with LMDB's in brackets, and exits 1.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "blocksnap.h"

#define MAX_RANGES 32

static uintptr_t starts[MAX_RANGES], ends[MAX_RANGES];
static volatile sig_atomic_t faults;
static struct sigaction previous_bus;
static int installed;
static uintptr_t page_size;
static char abort_message[512];
static size_t abort_message_len;
static char captured[512]; /* what C code printed to stdio's stderr (LMDB's assertion) */

static void pass_on(int sig, siginfo_t *info, void *ctx, struct sigaction *prev)
{
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction) {
            prev->sa_sigaction(sig, info, ctx);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    /* The default action: reinstate it; the faulting access runs again and the process dies of it. */
    signal(sig, SIG_DFL);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    uintptr_t a = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_RANGES; i++) {
        uintptr_t s = __atomic_load_n(&starts[i], __ATOMIC_ACQUIRE);
        uintptr_t e = __atomic_load_n(&ends[i], __ATOMIC_ACQUIRE);
        if (s && a >= s && a < e) {
            void *page = (void *)(a & ~(page_size - 1));
            if (mmap(page, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
                faults++;
                return;
            }
            break;
        }
    }
    pass_on(sig, info, ctx, &previous_bus);
}

int bs_guard_install(void)
{
    if (installed)
        return BS_OK;
    page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous_bus) != 0)
        return BS_EIO;
    installed = 1;
    return BS_OK;
}

int bs_guard_add(uint64_t start, uint64_t length)
{
    if (!start || !length)
        return BS_EINVAL;
    for (int i = 0; i < MAX_RANGES; i++) {
        uintptr_t expected = 0;
        /* Claim the slot by its start, then give it its end: until then the handler sees an empty range
         * (end 0), never another adder's end. */
        if (__atomic_compare_exchange_n(&starts[i], &expected, (uintptr_t)start, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&ends[i], (uintptr_t)(start + length), __ATOMIC_RELEASE);
            return BS_OK;
        }
    }
    return BS_EINVAL;
}

int bs_guard_remove(uint64_t start)
{
    for (int i = 0; i < MAX_RANGES; i++) {
        if (__atomic_load_n(&starts[i], __ATOMIC_ACQUIRE) == (uintptr_t)start) {
            __atomic_store_n(&ends[i], 0, __ATOMIC_RELEASE); /* first: the slot is free only once this is done */
            __atomic_store_n(&starts[i], 0, __ATOMIC_RELEASE);
            return BS_OK;
        }
    }
    return BS_EINVAL;
}

uint64_t bs_guard_faults(void)
{
    return (uint64_t)faults;
}

static void put(const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(2, p, n);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void on_sigabrt(int sig)
{
    (void)sig;
    size_t n = strnlen(captured, sizeof captured - 1);
    while (n && (captured[n - 1] == '\n' || captured[n - 1] == '\r'))
        n--;
    for (size_t i = 0; i < n; i++)
        if (captured[i] == '\n')
            captured[i] = ' ';
    put(abort_message, abort_message_len);
    if (n) {
        put(" (", 2);
        put(captured, n);
        put(")", 1);
    }
    put("\n", 1);
    _exit(1);
}

int bs_guard_abort_exit(const char *message)
{
    size_t n = strlen(message);
    if (n >= sizeof abort_message)
        n = sizeof abort_message - 1;
    memcpy(abort_message, message, n);
    abort_message_len = n;
    /* C code's prints to stdio's stderr (LMDB's assertion message, before it aborts) go into a buffer the
     * SIGABRT handler reports in its one line; Python writes to descriptor 2 itself and is not affected. */
    FILE *f = fmemopen(captured, sizeof captured - 1, "w");
    if (f) {
        setvbuf(f, NULL, _IONBF, 0);
        stderr = f;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigabrt;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGABRT, &sa, NULL) == 0 ? BS_OK : BS_EIO;
}
