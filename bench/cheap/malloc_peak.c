/* malloc_peak: an LD_PRELOAD interposer that counts the C heap of one process (live bytes, by
 * malloc_usable_size, and the peak since the last reset), for bench/micropython_footprint.py.
 *
 * Why: MicroPython's unix port has no ffi and Mbed TLS allocates from libc's heap there, so the
 * only way to see what one TLS session costs is to watch malloc from outside the interpreter.
 * The script being measured signals its own process (the shell's parent, via os.system):
 *   SIGUSR1  peak := live                      (start a measurement window)
 *   SIGUSR2  append "<live> <peak>\n" to the file named by MALLOC_PEAK_OUT
 * Built at bench time: gcc -O2 -shared -fPIC -o malloc_peak.so malloc_peak.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static void *(*real_memalign)(size_t, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void *(*real_pvalloc)(size_t);

static long live, peak;
static char out_path[4096];

/* dlsym() may call calloc before the real one is known: serve those from a static buffer that is
 * never freed (a few hundred bytes at most), and never hand its pointers to libc. */
static _Alignas(16) char boot_buf[16384];
static size_t boot_used;
static int resolving;

static int from_boot(const void *p) {
    return (const char *)p >= boot_buf && (const char *)p < boot_buf + sizeof boot_buf;
}

static void *boot_alloc(size_t n) {
    size_t at = (boot_used + 15) & ~(size_t)15;
    if (at + n > sizeof boot_buf)
        return NULL;
    boot_used = at + n;
    return boot_buf + at; /* static storage: already zero, as calloc promises */
}

static void add(void *p) {
    if (p && !from_boot(p)) {
        long now = __atomic_add_fetch(&live, (long)malloc_usable_size(p), __ATOMIC_RELAXED);
        long old = __atomic_load_n(&peak, __ATOMIC_RELAXED);
        while (now > old && !__atomic_compare_exchange_n(&peak, &old, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        }
    }
}

static void sub(void *p) {
    if (p && !from_boot(p))
        __atomic_sub_fetch(&live, (long)malloc_usable_size(p), __ATOMIC_RELAXED);
}

static char *put_long(char *s, long v) {
    char tmp[24];
    int n = 0;
    if (v < 0) {
        *s++ = '-';
        v = -v;
    }
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *s++ = tmp[--n];
    return s;
}

static void on_reset(int sig) {
    (void)sig;
    __atomic_store_n(&peak, __atomic_load_n(&live, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

static void on_report(int sig) {
    (void)sig;
    int saved = errno; /* only async-signal-safe calls below */
    char line[64], *e = line;
    e = put_long(e, __atomic_load_n(&live, __ATOMIC_RELAXED));
    *e++ = ' ';
    e = put_long(e, __atomic_load_n(&peak, __ATOMIC_RELAXED));
    *e++ = '\n';
    int fd = open(out_path, O_WRONLY | O_APPEND | O_CREAT, 0600);
    if (fd >= 0) {
        ssize_t w = write(fd, line, (size_t)(e - line));
        (void)w;
        close(fd);
    }
    errno = saved;
}

static void resolve(void) {
    if (real_malloc || resolving)
        return;
    resolving = 1;
    real_calloc = dlsym(RTLD_NEXT, "calloc");
    real_malloc = dlsym(RTLD_NEXT, "malloc");
    real_realloc = dlsym(RTLD_NEXT, "realloc");
    real_free = dlsym(RTLD_NEXT, "free");
    real_memalign = dlsym(RTLD_NEXT, "memalign");
    real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    real_valloc = dlsym(RTLD_NEXT, "valloc");
    real_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
    resolving = 0;
}

__attribute__((constructor)) static void init(void) {
    resolve();
    const char *p = getenv("MALLOC_PEAK_OUT");
    if (p && strlen(p) < sizeof out_path) {
        strcpy(out_path, p);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_flags = SA_RESTART;
        sa.sa_handler = on_reset;
        sigaction(SIGUSR1, &sa, NULL);
        sa.sa_handler = on_report;
        sigaction(SIGUSR2, &sa, NULL);
    }
    /* Count this process only: the shells and `kill`s it starts need not load the interposer. */
    unsetenv("LD_PRELOAD");
}

void *malloc(size_t n) {
    resolve();
    if (!real_malloc)
        return boot_alloc(n);
    void *p = real_malloc(n);
    add(p);
    return p;
}

void *calloc(size_t k, size_t n) {
    resolve();
    if (!real_calloc) {
        if (n && k > (size_t)-1 / n)
            return NULL;
        return boot_alloc(k * n);
    }
    void *p = real_calloc(k, n);
    add(p);
    return p;
}

void free(void *p) {
    if (!p || from_boot(p))
        return;
    resolve();
    sub(p);
    real_free(p);
}

void *realloc(void *p, size_t n) {
    resolve();
    if (p && from_boot(p)) { /* move a bootstrap block onto the real heap */
        void *q = malloc(n);
        if (q) {
            size_t room = (size_t)(boot_buf + sizeof boot_buf - (char *)p);
            memcpy(q, p, n < room ? n : room);
        }
        return q;
    }
    if (!real_realloc)
        return boot_alloc(n);
    long before = p ? (long)malloc_usable_size(p) : 0;
    void *q = real_realloc(p, n);
    if (q || n == 0) {
        __atomic_sub_fetch(&live, before, __ATOMIC_RELAXED);
        add(q);
    }
    return q;
}

void *reallocarray(void *p, size_t k, size_t n) {
    if (n && k > (size_t)-1 / n) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, k * n);
}

void *memalign(size_t a, size_t n) {
    resolve();
    void *p = real_memalign(a, n);
    add(p);
    return p;
}

int posix_memalign(void **out, size_t a, size_t n) {
    resolve();
    int r = real_posix_memalign(out, a, n);
    if (r == 0)
        add(*out);
    return r;
}

void *aligned_alloc(size_t a, size_t n) {
    resolve();
    void *p = real_aligned_alloc(a, n);
    add(p);
    return p;
}

void *valloc(size_t n) {
    resolve();
    void *p = real_valloc(n);
    add(p);
    return p;
}

void *pvalloc(size_t n) {
    resolve();
    void *p = real_pvalloc(n);
    add(p);
    return p;
}
