// The one entry point of a per-ISA build of llama.cpp's quantized dot products (ggml-quants.c, ggml-cpu/quants.c
// and, on x86, ggml-cpu/arch/x86/quants.c, compiled from the llama-cpp-python sdist by ggml_build.py).
//
// Everything else is hidden (-fvisibility=hidden): several levels load side by side (dlopen RTLD_LOCAL) and
// none clashes with a libggml llama-cpp-python may have loaded. sg_ggml_kernels() returns a table of function
// pointers per ggml type; the torch op (ggml_quant.cpp) reads it, and the layout below is mirrored there.
#include "ggml.h"
#include "ggml-impl.h"
#include "ggml-quants.h"
#include "ggml-cpu-impl.h"
#include "quants.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

// ggml-cpu.c owns these tables and fills them in ggml_cpu_init(); the dot products read them
float ggml_table_f32_f16[1 << 16];
float ggml_table_f32_e8m0_half[1 << 8];
float ggml_table_f32_ue4m3[1 << 8];

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "%s:%d: ", file, line);
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
    abort();
}

typedef void (*sg_vec_dot_t)(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
typedef void (*sg_from_float_t)(const float * x, void * y, int64_t k);
typedef void (*sg_to_float_t)(const void * x, float * y, int64_t k);

typedef struct {
    int32_t qtype;           // ggml_type of the weight
    int32_t vec_dot_type;    // ggml_type the activations are quantized to
    int32_t block_size;      // values per weight block
    int32_t block_bytes;     // bytes per weight block
    int32_t vd_block_size;   // values per activation block
    int32_t vd_block_bytes;  // bytes per activation block
    sg_vec_dot_t vec_dot;            // one weight row . one quantized activation row
    sg_from_float_t quantize_vd;     // activations -> vec_dot_type blocks (SIMD)
    sg_to_float_t dequantize;        // weight blocks -> float32
    sg_from_float_t quantize_ref;    // float32 -> weight blocks (llama.cpp's reference quantizer, for tests)
} sg_ggml_type_kernels;

#define SG_MAX_TYPES 16

typedef struct {
    int32_t abi_version;  // bumped when this layout changes
    int32_t count;
    const char * level;
    sg_ggml_type_kernels types[SG_MAX_TYPES];
} sg_ggml_kernels_table;

#ifndef SG_LEVEL
#define SG_LEVEL "unknown"
#endif

static sg_ggml_kernels_table table;

static int type_size_of(enum ggml_type t, int * block_size) {
    switch (t) {
        case GGML_TYPE_Q4_0: *block_size = QK4_0; return sizeof(block_q4_0);
        case GGML_TYPE_Q4_1: *block_size = QK4_1; return sizeof(block_q4_1);
        case GGML_TYPE_Q5_0: *block_size = QK5_0; return sizeof(block_q5_0);
        case GGML_TYPE_Q5_1: *block_size = QK5_1; return sizeof(block_q5_1);
        case GGML_TYPE_Q8_0: *block_size = QK8_0; return sizeof(block_q8_0);
        case GGML_TYPE_Q8_1: *block_size = QK8_1; return sizeof(block_q8_1);
        case GGML_TYPE_Q2_K: *block_size = QK_K; return sizeof(block_q2_K);
        case GGML_TYPE_Q3_K: *block_size = QK_K; return sizeof(block_q3_K);
        case GGML_TYPE_Q4_K: *block_size = QK_K; return sizeof(block_q4_K);
        case GGML_TYPE_Q5_K: *block_size = QK_K; return sizeof(block_q5_K);
        case GGML_TYPE_Q6_K: *block_size = QK_K; return sizeof(block_q6_K);
        case GGML_TYPE_Q8_K: *block_size = QK_K; return sizeof(block_q8_K);
        default: *block_size = 0; return 0;
    }
}

// ggml-quants.c asks these only while validating rows, which sglite does in Python before any call
size_t ggml_type_size(enum ggml_type t) {
    int block_size;
    return (size_t) type_size_of(t, &block_size);
}

size_t ggml_row_size(enum ggml_type t, int64_t ne) {
    int block_size;
    size_t bytes = (size_t) type_size_of(t, &block_size);
    return block_size ? bytes * (size_t) (ne / block_size) : 0;
}

const char * ggml_type_name(enum ggml_type t) {
    (void) t;
    return "ggml type";
}

static void add(enum ggml_type t, enum ggml_type vd, sg_vec_dot_t vec_dot, sg_from_float_t quantize_vd,
                sg_to_float_t dequantize, sg_from_float_t quantize_ref) {
    sg_ggml_type_kernels * k = &table.types[table.count++];
    k->qtype = t;
    k->vec_dot_type = vd;
    k->block_bytes = type_size_of(t, &k->block_size);
    k->vd_block_bytes = type_size_of(vd, &k->vd_block_size);
    k->vec_dot = vec_dot;
    k->quantize_vd = quantize_vd;
    k->dequantize = dequantize;
    k->quantize_ref = quantize_ref;
}

#define ADD(T, t, VD, vd) \
    add(GGML_TYPE_##T, GGML_TYPE_##VD, ggml_vec_dot_##t##_##vd, quantize_row_##vd, \
        (sg_to_float_t) dequantize_row_##t, (sg_from_float_t) quantize_row_##t##_ref)

__attribute__((visibility("default"))) const sg_ggml_kernels_table * sg_ggml_kernels(void) {
    if (table.count) {
        return &table;
    }
    for (int i = 0; i < (1 << 16); ++i) {
        union { uint16_t u16; ggml_fp16_t fp16; } u = {(uint16_t) i};
        ggml_table_f32_f16[i] = GGML_COMPUTE_FP16_TO_FP32(u.fp16);
    }
    for (int i = 0; i < (1 << 8); ++i) {
        ggml_table_f32_e8m0_half[i] = GGML_E8M0_TO_FP32_HALF(i);
        ggml_table_f32_ue4m3[i] = ggml_ue4m3_to_fp32((uint8_t) i);
    }
    table.abi_version = 1;
    table.level = SG_LEVEL;
    ADD(Q4_0, q4_0, Q8_0, q8_0);
    ADD(Q4_1, q4_1, Q8_1, q8_1);
    ADD(Q5_0, q5_0, Q8_0, q8_0);
    ADD(Q5_1, q5_1, Q8_1, q8_1);
    ADD(Q8_0, q8_0, Q8_0, q8_0);
    ADD(Q2_K, q2_K, Q8_K, q8_K);
    ADD(Q3_K, q3_K, Q8_K, q8_K);
    ADD(Q4_K, q4_K, Q8_K, q8_K);
    ADD(Q5_K, q5_K, Q8_K, q8_K);
    ADD(Q6_K, q6_K, Q8_K, q8_K);
    return &table;
}
