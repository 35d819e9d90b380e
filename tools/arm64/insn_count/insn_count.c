/*
 * insn_count: a QEMU TCG plugin that counts the aarch64 instructions a guest executes inside regions the guest
 * marks itself, split into classes (SIMD vector, dot product, SIMD/FP loads and stores, FP/SIMD scalar,
 * integer, general loads and stores, branches, other).
 *
 *   qemu-aarch64 -plugin libinsn_count.so,out=regions.jsonl PROGRAM...
 *
 * Why regions: a whole process's count varies by tens of millions of instructions between identical runs
 * (dynamic loading, Python start-up, allocator state), which would drown one inference. The guest brackets
 * what it wants counted with a system call no kernel implements (REGION_SYSCALL; Linux and QEMU both answer
 * ENOSYS, so the guest program runs unchanged on a real Pi), carrying REGION_MAGIC and REGION_BEGIN or
 * REGION_END. Each region appends one JSON line to `out` when it ends:
 *   {"region": 0, "instructions": N, "classes": {"simd_vector": N, ...}, "threads": T}
 * `threads` is how many guest threads executed instructions inside the region.
 *
 * How: when QEMU translates a block of guest code, the block's instructions are classified once (by their
 * encoding, A64 instruction set encoding index of the Arm ARM) into a per-block histogram; each execution of
 * the block adds that histogram to the executing thread's counters while a region is open. A block is counted
 * whole when entered; one left early by a fault is over-counted by its remaining instructions (rare, and the
 * same in every run).
 *
 * Built against the qemu-plugin.h of the exact QEMU that loads it (benchmarks/arm_count.py does this).
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* Shared with the guest side (tools/arm64/insn_count/count_inference.py). */
#define REGION_SYSCALL 0x5bc0
#define REGION_MAGIC UINT64_C(0x5bc0c0a7c0417e57)
#define REGION_BEGIN 1
#define REGION_END 2

enum insn_class {
    CLASS_SIMD_VECTOR,     /* Advanced SIMD on vectors (and SVE), except dot product */
    CLASS_DOT_PRODUCT,     /* SDOT/UDOT: ARMv8.2 int8 dot product (Cortex-A76 has it, Cortex-A72 not) */
    CLASS_SIMD_LOAD_STORE, /* loads and stores of SIMD&FP registers (LD1/ST1, LDR q/d/s, LDP q...) */
    CLASS_FP_SIMD_SCALAR,  /* scalar floating point and Advanced SIMD scalar */
    CLASS_INTEGER,         /* data processing on general registers, immediate and register forms */
    CLASS_LOAD_STORE,      /* loads and stores of general registers, atomics */
    CLASS_BRANCH,          /* B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ, BR/BLR/RET */
    CLASS_OTHER,           /* system (barriers, hints, MRS/MSR), exception generation, unallocated */
    CLASS_COUNT
};

static const char *const class_names[CLASS_COUNT] = {
    "simd_vector", "dot_product", "simd_load_store", "fp_simd_scalar",
    "integer",     "load_store",  "branch",          "other",
};

static enum insn_class classify(uint32_t insn)
{
    uint32_t op0 = (insn >> 25) & 0xf; /* bits 28:25 select the top-level encoding group */

    switch (op0) {
    case 0x8: case 0x9: /* 100x: data processing, immediate */
    case 0x5: case 0xd: /* x101: data processing, register */
        return CLASS_INTEGER;
    case 0xa: case 0xb: /* 101x: branches, exception generation, system */
        if ((insn & 0x7c000000) == 0x14000000 || /* B, BL */
            (insn & 0x7e000000) == 0x34000000 || /* CBZ, CBNZ */
            (insn & 0x7e000000) == 0x36000000 || /* TBZ, TBNZ */
            (insn & 0xfe000000) == 0x54000000 || /* B.cond */
            (insn & 0xfe000000) == 0xd6000000) { /* BR, BLR, RET (register) */
            return CLASS_BRANCH;
        }
        return CLASS_OTHER;
    case 0x4: case 0x6: case 0xc: case 0xe: /* x1x0: loads and stores; bit 26 (V) = SIMD&FP register */
        return (insn & (1u << 26)) ? CLASS_SIMD_LOAD_STORE : CLASS_LOAD_STORE;
    case 0x7: case 0xf: /* x111: data processing, SIMD and FP; bit 28 clear = Advanced SIMD vector */
        if (insn & (1u << 28)) {
            return CLASS_FP_SIMD_SCALAR;
        }
        if ((insn & 0x9fe0fc00) == 0x0e809400 || /* SDOT/UDOT (vector) */
            (insn & 0x9fc0f400) == 0x0f80e000) { /* SDOT/UDOT (by element) */
            return CLASS_DOT_PRODUCT;
        }
        return CLASS_SIMD_VECTOR;
    case 0x2: /* SVE: neither Pi has it; vector work all the same */
        return CLASS_SIMD_VECTOR;
    default: /* 0000 reserved/SME, 0001 and 0011 unallocated */
        return CLASS_OTHER;
    }
}

typedef struct {
    uint64_t counts[CLASS_COUNT];
} histogram;

/*
 * One row of counters per guest thread (QEMU numbers user-mode threads as vCPUs), a cache line each, so threads
 * never contend. Threads beyond MAX_THREADS share the last row with atomic adds.
 */
#define MAX_THREADS 1024
typedef struct {
    uint64_t counts[CLASS_COUNT];
} __attribute__((aligned(64))) thread_counters;

static thread_counters counters[MAX_THREADS];
static bool region_open;
static uint64_t regions_closed;
static FILE *out;

static void block_executed(unsigned int vcpu_index, void *userdata)
{
    if (!__atomic_load_n(&region_open, __ATOMIC_RELAXED)) {
        return;
    }
    const histogram *block = userdata;
    if (vcpu_index < MAX_THREADS - 1) {
        uint64_t *row = counters[vcpu_index].counts;
        for (int i = 0; i < CLASS_COUNT; i++) {
            row[i] += block->counts[i];
        }
    } else {
        uint64_t *row = counters[MAX_THREADS - 1].counts;
        for (int i = 0; i < CLASS_COUNT; i++) {
            __atomic_fetch_add(&row[i], block->counts[i], __ATOMIC_RELAXED);
        }
    }
}

static void block_translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    /* Never freed: QEMU has no callback for a block's end of life, and blocks are few (tens of thousands). */
    histogram *block = calloc(1, sizeof(*block));
    if (block == NULL) {
        qemu_plugin_outs("insn_count: out of memory\n");
        abort();
    }
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        const struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t word;
        if (qemu_plugin_insn_size(insn) != sizeof(word)) {
            block->counts[CLASS_OTHER]++; /* A64 instructions are all 4 bytes; never seen */
            continue;
        }
        memcpy(&word, qemu_plugin_insn_data(insn), sizeof(word)); /* little-endian guest and host */
        block->counts[classify(word)]++;
    }
    qemu_plugin_register_vcpu_tb_exec_cb(tb, block_executed, QEMU_PLUGIN_CB_NO_REGS, block);
}

static void region_begin(void)
{
    memset(counters, 0, sizeof(counters));
    __atomic_store_n(&region_open, true, __ATOMIC_RELEASE);
}

static void region_end(void)
{
    __atomic_store_n(&region_open, false, __ATOMIC_RELEASE);
    uint64_t totals[CLASS_COUNT] = {0};
    uint64_t total = 0;
    int threads = 0;
    for (int t = 0; t < MAX_THREADS; t++) {
        uint64_t thread_total = 0;
        for (int i = 0; i < CLASS_COUNT; i++) {
            uint64_t count = __atomic_load_n(&counters[t].counts[i], __ATOMIC_RELAXED);
            totals[i] += count;
            thread_total += count;
        }
        total += thread_total;
        threads += thread_total > 0;
    }
    fprintf(out, "{\"region\": %" PRIu64 ", \"instructions\": %" PRIu64 ", \"classes\": {", regions_closed, total);
    for (int i = 0; i < CLASS_COUNT; i++) {
        fprintf(out, "%s\"%s\": %" PRIu64, i ? ", " : "", class_names[i], totals[i]);
    }
    fprintf(out, "}, \"threads\": %d}\n", threads);
    fflush(out); /* the guest may be killed or crash after this region: what was measured is on disk */
    regions_closed++;
}

static void syscall_entered(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1, uint64_t a2,
                            uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != REGION_SYSCALL || a1 != REGION_MAGIC) {
        return;
    }
    bool open = __atomic_load_n(&region_open, __ATOMIC_ACQUIRE);
    if (a2 == REGION_BEGIN && !open) {
        region_begin();
    } else if (a2 == REGION_END && open) {
        region_end();
    } else {
        /* Nested or unbalanced markers: a bug in the guest driver, which must not give a plausible number. */
        fprintf(out, "{\"error\": \"unbalanced region marker %" PRIu64 " (region %s)\"}\n", a2,
                open ? "open" : "closed");
        fflush(out);
    }
}

static void exited(qemu_plugin_id_t id, void *userdata)
{
    if (__atomic_load_n(&region_open, __ATOMIC_ACQUIRE)) {
        fprintf(out, "{\"error\": \"the program exited inside a region\"}\n");
    }
    fclose(out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *out_path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = argv[i] + 4;
        } else {
            fprintf(stderr, "insn_count: unknown argument %s (expected out=FILE)\n", argv[i]);
            return -1;
        }
    }
    if (out_path == NULL) {
        fprintf(stderr, "insn_count: give the output file: -plugin libinsn_count.so,out=FILE\n");
        return -1;
    }
    if (strcmp(info->target_name, "aarch64") != 0) {
        fprintf(stderr, "insn_count: classifies A64 instructions only, not %s\n", info->target_name);
        return -1;
    }
    out = fopen(out_path, "w");
    if (out == NULL) {
        perror(out_path);
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, block_translated);
    qemu_plugin_register_vcpu_syscall_cb(id, syscall_entered);
    qemu_plugin_register_atexit_cb(id, exited, NULL);
    return 0;
}
