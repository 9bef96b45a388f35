/* calc: a tiny library whose behaviour depends on the CPU and ABI it is built for,
 * so that testing it on several architectures means something. */
#ifndef CALC_H
#define CALC_H

#include <stdbool.h>
#include <stdint.h>

/* a + b. */
long calc_add(long a, long b);

/* Stores a * b in *out and returns true, or returns false (leaving *out alone) if the
 * product does not fit in a long. */
bool calc_mul_checked(long a, long b, long *out);

/* x with its four bytes in reverse order. */
uint32_t calc_bswap32(uint32_t x);

/* The width of a long in bits: 64 on LP64 ABIs, which all three targets use. */
unsigned calc_long_bits(void);

/* True when the CPU stores the least significant byte first. */
bool calc_little_endian(void);

/* The architecture this code was compiled for, in runner's names: "riscv64", "aarch64",
 * "x86_64", or "unknown". */
const char *calc_arch(void);

#endif
