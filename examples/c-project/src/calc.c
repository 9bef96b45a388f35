#include "calc.h"

#include <limits.h>
#include <string.h>

long calc_add(long a, long b)
{
    return a + b;
}

bool calc_mul_checked(long a, long b, long *out)
{
    long product;
    /* GCC and Clang check the multiplication in the target's own width. */
    if (__builtin_mul_overflow(a, b, &product))
        return false;
    *out = product;
    return true;
}

uint32_t calc_bswap32(uint32_t x)
{
    /* Written out rather than __builtin_bswap32 so that the test checks our code. */
    return (x >> 24) | ((x >> 8) & 0x0000ff00u) | ((x << 8) & 0x00ff0000u) | (x << 24);
}

unsigned calc_long_bits(void)
{
    return (unsigned)(sizeof(long) * CHAR_BIT);
}

bool calc_little_endian(void)
{
    uint16_t word = 1;
    unsigned char first;
    memcpy(&first, &word, 1);
    return first == 1;
}

const char *calc_arch(void)
{
#if defined(__riscv) && __riscv_xlen == 64
    return "riscv64";
#elif defined(__aarch64__)
    return "aarch64";
#elif defined(__x86_64__)
    return "x86_64";
#else
    return "unknown";
#endif
}
