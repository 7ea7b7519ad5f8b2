/* kernel_cases.h: what the forward and backward kernel tests (test_kernels.c,
 * test_kernels_bwd.c) share, so that both run the same awkward problems the same way.
 *
 * Defines: the seeded random generator (kc_seed, kc_randn, kc_random_floats, kc_zero_floats,
 * kc_to_double); the table of attention cases (kc_case, kc_cases, kc_case_count) and a problem's
 * random inputs and positions (kc_inputs, kc_make_inputs, kc_free_inputs); the uneven cut of the
 * keys into blocks (kc_split_keys); head copies between dense and wide tensors (kc_gather_heads,
 * kc_scatter_heads); and the closeness checks with their failure report (kc_current_case,
 * kc_print_case, kc_check_close, kc_check_close_f, kc_max).
 *
 * Layouts, row-major: queries [nq, H, d], keys and values [nk, G, d], lse [nq, H]; H = heads,
 * G = kv_heads (H a multiple of G), d = head_dim. Checks and allocations fail the running
 * cmocka test.
 */
#ifndef SPAR_TESTS_KERNEL_CASES_H
#define SPAR_TESTS_KERNEL_CASES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h" // defines: spar_attn_dims

/* --- random inputs ------------------------------------------------------------------------ */

/* Sets the xorshift64 state (non-zero) that every kc_ draw below advances. */
void kc_seed(uint64_t state);

/* Irwin-Hall sum of four uniforms, centred: bell-shaped, within [-2, 2]. */
float kc_randn(void);

/* count floats from kc_randn / zeroed (at least one allocated); asserts the allocation. */
float *kc_random_floats(int64_t count);
float *kc_zero_floats(int64_t count);

/* A new array of the n floats of x as doubles. */
double *kc_to_double(int64_t n, const float *x);

/* --- the cases ---------------------------------------------------------------------------- */

/* Positions of queries i and keys j: none; i and j; the stripe 3i + 1 and 3j + 2; sorted with
 * random gaps of 1..4; 100 + i and j (every key in every query's past). */
enum kc_pos { KC_POS_NONE, KC_POS_SAME, KC_POS_STRIPE, KC_POS_RANDOM, KC_POS_QUERIES_LATE };

typedef struct kc_case {
    int heads, kv_heads, head_dim;
    int64_t nq, nk;
    bool causal;
    enum kc_pos pos;
} kc_case;

/* The awkward shapes: head_dim 1 and odd, GQA (H=6, G=2), MQA (H=4, G=1), nq != nk, and
 * sorted but irregular positions. kc_cases[2] is GQA causal with positions 0..11. */
extern const kc_case kc_cases[];
extern const size_t kc_case_count;

/* A problem's inputs. q: [nq, H, d]; k, v: [nk, G, d]; dout: [nq, H, d] or NULL;
 * q_pos: [nq], k_pos: [nk], NULL for KC_POS_NONE. dims.scale = 1 / sqrt(d). */
typedef struct kc_inputs {
    spar_attn_dims dims;
    float *q, *k, *v, *dout;
    int64_t *q_pos, *k_pos;
} kc_inputs;

/* Seeds the generator from seed, then draws q, k, v, dout (when with_dout) and the positions,
 * in that order: the same seed gives the same problem. */
kc_inputs kc_make_inputs(const kc_case *c, uint64_t seed, bool with_dout);
void kc_free_inputs(kc_inputs *in);

/* cut[0..parts]: keys [0, nk) cut into parts (2 or 3) uneven non-empty blocks
 * [cut[b], cut[b + 1]); needs nk >= parts. */
void kc_split_keys(int64_t nk, int parts, int64_t cut[4]);

/* --- strided views ------------------------------------------------------------------------ */

/* dense: [n, count, w] <- heads [h0, h0 + count) of wide: [n, heads, w] (w = d, or 1 for lse). */
void kc_gather_heads(int64_t n, int heads, int h0, int count, int w, const float *wide,
                     float *dense);

/* Heads [h0, h0 + count) of wide: [n, heads, w] <- dense: [n, count, w]. */
void kc_scatter_heads(int64_t n, int heads, int h0, int count, int w, const float *dense,
                      float *wide);

/* --- checks ------------------------------------------------------------------------------- */

/* The case named when a check fails (NULL: none); tests set it before checking. */
extern const kc_case *kc_current_case;

/* Prints c's shape to stderr (nothing for NULL). */
void kc_print_case(const kc_case *c);

/* Asserts that got matches ref over n values: relative L2 error <= tol and every element
 * within |got - ref| <= tol + 10 tol |ref|. Entries where ref is -inf (a row that saw no
 * key) must be -inf in got too and are left out of the norm. Prints the worst element.
 * Returns the relative L2 error, for the worst-case summary a test prints. */
double kc_check_close(const char *what, int64_t n, const float *got, const double *ref, double tol);

/* Same as kc_check_close but against a float result (one path against another). */
double kc_check_close_f(const char *what, int64_t n, const float *got, const float *ref,
                        double tol);

double kc_max(double a, double b);

#endif
