/* Tests for calc. Prints TAP-like lines as it goes and writes a JUnit XML report.
 *
 *   usage: test_calc REPORT.xml
 *
 * Exit status: 0 if every test passed, 1 if any failed, 2 if the report cannot be written. */
#define _POSIX_C_SOURCE 200809L

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../src/calc.h"

/* A test returns NULL when it passes, or a message saying what went wrong. */
typedef const char *(*test_fn)(void);

/* Room for a failure message that includes values. */
static char message[256];

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            snprintf(message, sizeof message, "%s:%d: check failed: %s", __FILE__,   \
                     __LINE__, #cond);                                                \
            return message;                                                           \
        }                                                                             \
    } while (0)

static const char *test_add(void)
{
    CHECK(calc_add(2, 3) == 5);
    CHECK(calc_add(-7, 7) == 0);
    CHECK(calc_add(LONG_MAX - 1, 1) == LONG_MAX);
    return NULL;
}

static const char *test_mul_checked_in_range(void)
{
    long out = 0;
    CHECK(calc_mul_checked(6, 7, &out) && out == 42);
    CHECK(calc_mul_checked(-4, 5, &out) && out == -20);
    CHECK(calc_mul_checked(1L << 31, 1L << 31, &out) && out == 1L << 62);
    return NULL;
}

static const char *test_mul_checked_overflow(void)
{
    long out = 123;
    CHECK(!calc_mul_checked(LONG_MAX, 2, &out));
    CHECK(!calc_mul_checked(LONG_MIN, -1, &out));
    CHECK(!calc_mul_checked(1L << 32, 1L << 32, &out));
    CHECK(out == 123); /* untouched on overflow */
    return NULL;
}

static const char *test_bswap32(void)
{
    CHECK(calc_bswap32(0x11223344u) == 0x44332211u);
    CHECK(calc_bswap32(0x000000ffu) == 0xff000000u);
    CHECK(calc_bswap32(calc_bswap32(0xdeadbeefu)) == 0xdeadbeefu);
    return NULL;
}

static const char *test_long_is_64_bits(void)
{
    if (calc_long_bits() != 64) {
        snprintf(message, sizeof message, "long has %u bits, expected 64 (LP64)",
                 calc_long_bits());
        return message;
    }
    return NULL;
}

static const char *test_little_endian(void)
{
    CHECK(calc_little_endian());
    return NULL;
}

/* The binary must have been built for the architecture runner says the guest is. */
static const char *test_built_for_runner_arch(void)
{
    const char *want = getenv("RUNNER_ARCH");
    if (want == NULL)
        return NULL; /* not under runner: nothing to compare with */
    if (strcmp(want, calc_arch()) != 0) {
        snprintf(message, sizeof message, "built for %s but RUNNER_ARCH is %s", calc_arch(),
                 want);
        return message;
    }
    return NULL;
}

static const struct {
    const char *name;
    test_fn fn;
} tests[] = {
    {"add", test_add},
    {"mul_checked_in_range", test_mul_checked_in_range},
    {"mul_checked_overflow", test_mul_checked_overflow},
    {"bswap32", test_bswap32},
    {"long_is_64_bits", test_long_is_64_bits},
    {"little_endian", test_little_endian},
    {"built_for_runner_arch", test_built_for_runner_arch},
};

#define NTESTS (sizeof tests / sizeof tests[0])

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Writes s with XML's special characters escaped. */
static void xml_escaped(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\'': fputs("&apos;", f); break;
        default: fputc(*s, f);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s REPORT.xml\n", argv[0]);
        return 2;
    }

    const char *failures[NTESTS];
    double times[NTESTS];
    size_t failed = 0;
    double started = now();

    printf("1..%zu\n", NTESTS);
    for (size_t i = 0; i < NTESTS; i++) {
        double t0 = now();
        const char *failure = tests[i].fn();
        times[i] = now() - t0;
        /* The message buffer is reused by the next test, so keep a copy. */
        failures[i] = failure ? strdup(failure) : NULL;
        if (failure) {
            failed++;
            printf("not ok %zu - %s # %s\n", i + 1, tests[i].name, failure);
        } else {
            printf("ok %zu - %s\n", i + 1, tests[i].name);
        }
    }
    double total = now() - started;
    printf("# %s: %zu passed, %zu failed\n", calc_arch(), NTESTS - failed, failed);

    FILE *f = fopen(argv[1], "w");
    if (f == NULL) {
        perror(argv[1]);
        return 2;
    }
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(f, "<testsuites tests=\"%zu\" failures=\"%zu\" time=\"%.6f\">\n", NTESTS, failed,
            total);
    fprintf(f,
            "  <testsuite name=\"calc\" tests=\"%zu\" failures=\"%zu\" errors=\"0\" "
            "skipped=\"0\" time=\"%.6f\">\n",
            NTESTS, failed, total);
    for (size_t i = 0; i < NTESTS; i++) {
        fprintf(f, "    <testcase classname=\"calc\" name=\"");
        xml_escaped(f, tests[i].name);
        fprintf(f, "\" time=\"%.6f\"", times[i]);
        if (failures[i]) {
            fprintf(f, ">\n      <failure message=\"");
            xml_escaped(f, failures[i]);
            fprintf(f, "\"/>\n    </testcase>\n");
        } else {
            fprintf(f, "/>\n");
        }
    }
    fprintf(f, "  </testsuite>\n</testsuites>\n");
    if (fclose(f) != 0) {
        perror(argv[1]);
        return 2;
    }
    return failed ? 1 : 0;
}
